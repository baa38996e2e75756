"""Cosine ("NormedLinear") classifier of LDAM teachers.

Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019, and the
Saddle-LongTail teachers (kaidic/LDAM-DRW `models/resnet_cifar.py` NormedLinear):
logit_j = <f / ||f||, v_j / ||v_j||> in [-1, 1]. The weight is stored as (in_features, num_classes), the transpose
of `nn.Linear`, and there is no bias, so released LDAM
checkpoints (`linear.weight` of shape (64, C) for ResNet-32, `fc.weight` (2048, C) for ResNet-50) load unchanged.
The scale s = 30 belongs to the loss, not the module: a loaded LDAM teacher outputs raw cosines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['NormedLinear', 'COSINE_LOGIT_SCALE']

# The LDAM scale s: multiply a cosine head's outputs by it to get logits on the scale the teacher was trained at
# (soft distillation needs this; argmax does not).
COSINE_LOGIT_SCALE = 30.0


class NormedLinear(nn.Module):
    """Cosine similarity between the L2-normalised feature and each L2-normalised class vector.

    Args:
        in_features: feature width d.
        out_features: number of classes C.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # LDAM-DRW's init: uniform(-1, 1), then every class column scaled to unit L2 norm (the renorm-to-1e-5
        # then x1e5 idiom of the original equals a column normalisation for any non-zero column).
        self.weight.uniform_(-1.0, 1.0)
        self.weight.div_(self.weight.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, C) cosines."""
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}'
