"""Feature rank of the CLS and DIST token features at every block, over a fixed image set.

DeiT-LT (Rangwani et al., CVPR 2024) reports that the DIST-token features of students distilled from SAM-trained
teachers have lower rank across blocks than those of baselines, and links it to tail generalisation; Andriushchenko
et al. ("Sharpness-Aware Minimization Leads to Low-Rank Features", NeurIPS 2023) show the effect in SAM-trained
networks themselves.

For a feature matrix F (N images x d features) at one block and token, with singular values s_1 >= s_2 >= ... of
F - mean(F) (centred over the images: PCA's spectrum, so a common offset shared by every image is not a
direction of its own; `center=False` keeps F as it is):

- numerical rank at relative tolerance rtol: #{i : s_i > rtol * s_1};
- variance rank at fraction q: the fewest leading principal components whose variance sum_{i<=k} s_i^2 reaches
  q of the total (Andriushchenko et al. use q = 0.99);
- the normalised spectrum s_i / s_1.

Both ranks are bounded by min(N, d) (N - 1 when centred), so the image set must be larger than the width to
say anything about full rank.

Where features are read (forward hooks, so nothing of the forward pass is re-implemented):
- transformers: the residual stream at the output of every block (`model.blocks[i]`), token 0 (CLS) and, for
  distilled students, token 1 (DIST), before the final norm that only the last block's output passes through;
- CNNs with timm `feature_info` (the CIFAR ResNets): every listed stage's output, global-average-pooled;
- any other model: the input of its classifier (`get_classifier()`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..models.factory import is_distilled, unwrap_model

__all__ = ['singular_values', 'numerical_rank', 'variance_rank', 'rank_summary', 'FeatureRecorder']


def singular_values(features: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Singular values (descending, float64, on the CPU) of an (N, d) feature matrix, centred over N by default."""
    f = features.detach().to('cpu', torch.float64)
    if center:
        f = f - f.mean(0, keepdim=True)
    return torch.linalg.svdvals(f)


def numerical_rank(s: torch.Tensor, rtol: float) -> int:
    """Number of singular values above `rtol` times the largest (0 for an all-zero matrix)."""
    if not len(s) or float(s[0]) <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def variance_rank(s: torch.Tensor, fraction: float = 0.99) -> int:
    """Fewest leading components whose squared singular values reach `fraction` of the total (0 if all zero)."""
    energy = s.to(torch.float64) ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0
    reached = torch.cumsum(energy, 0) >= fraction * total * (1 - 1e-12)   # tolerate round-off at fraction = 1
    return int(torch.nonzero(reached)[0]) + 1


def rank_summary(features: torch.Tensor, rtol: float = 1e-3, fraction: float = 0.99, center: bool = True) -> dict:
    """{'rank', 'variance_rank', 'spectrum' (s_i / s_1), 'num_samples', 'dim'} of an (N, d) feature matrix."""
    s = singular_values(features, center)
    top = float(s[0]) if len(s) else 0.0
    return {'rank': numerical_rank(s, rtol), 'variance_rank': variance_rank(s, fraction),
            'spectrum': (s / top).tolist() if top > 0 else s.tolist(),
            'num_samples': int(features.shape[0]), 'dim': int(features.shape[1])}


class FeatureRecorder:
    """Collects per-image features at every block (or stage) of a model through forward hooks.

    Args:
        model: a timm ViT / distilled DeiT, a CNN with `feature_info`, or any model with `get_classifier()`.

    Attributes:
        sites: labels of the places features are read at, in forward order ('block 1', ..., or stage names).
        tokens: feature names per site: 'cls' (+ 'dist') for transformers, 'pooled' for CNN stages, 'head_input'
            for the classifier-input fallback.
        kind: 'blocks', 'stages' or 'head_input'.
    """

    def __init__(self, model: nn.Module):
        m = unwrap_model(model)
        self._sites: list[tuple[str, nn.Module]] = []
        blocks = getattr(m, 'blocks', None)
        if isinstance(blocks, nn.Sequential) and getattr(m, 'cls_token', None) is not None:
            self.kind = 'blocks'
            self.tokens = {'cls': 0, **({'dist': 1} if is_distilled(m) else {})}
            self._sites = [(f'block {i + 1}', b) for i, b in enumerate(blocks)]
        elif isinstance(getattr(m, 'feature_info', None), (list, tuple)) and m.feature_info:
            self.kind = 'stages'
            self.tokens = {'pooled': None}
            self._sites = [(fi['module'], m.get_submodule(fi['module'])) for fi in m.feature_info]
        elif hasattr(m, 'get_classifier') and isinstance(m.get_classifier(), nn.Module):
            self.kind = 'head_input'
            self.tokens = {'head_input': None}
            self._sites = [('head input', m.get_classifier())]
        else:
            raise ValueError(f'{type(m).__name__}: no transformer blocks, feature_info stages or classifier to read '
                             f'features from')
        self.sites = [label for label, _ in self._sites]
        self._parts: dict[str, dict[str, list[torch.Tensor]]] = {t: {s: [] for s in self.sites} for t in self.tokens}

    def _store(self, site: str, out: torch.Tensor) -> None:
        out = out.detach()
        if self.kind == 'blocks':
            for name, idx in self.tokens.items():
                self._parts[name][site].append(out[:, idx].float().cpu())
        elif self.kind == 'stages':
            pooled = out.mean(dim=(2, 3)) if out.ndim == 4 else out.reshape(len(out), -1)
            self._parts['pooled'][site].append(pooled.float().cpu())
        else:
            self._parts['head_input'][site].append(out.reshape(len(out), -1).float().cpu())

    @contextlib.contextmanager
    def hooks(self) -> Iterator['FeatureRecorder']:
        """Record while inside the context (forward hooks on every site; a forward pre-hook on the classifier)."""
        handles = []
        try:
            for label, module in self._sites:
                if self.kind == 'head_input':
                    handles.append(module.register_forward_pre_hook(
                        lambda _m, args, label=label: self._store(label, args[0])))
                else:
                    handles.append(module.register_forward_hook(
                        lambda _m, _inp, out, label=label: self._store(label, out)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def features(self, token: str, site: str) -> torch.Tensor:
        """(N, d) float32 features of `token` at `site` over every image recorded so far."""
        return torch.cat(self._parts[token][site])

    def result(self, rtol: float = 1e-3, fraction: float = 0.99, center: bool = True) -> dict:
        """{'sites', 'kind', 'tokens': {token: [rank_summary per site]}, 'rtol', 'variance_fraction', 'center'}."""
        if not self._parts or not any(self._parts[t][self.sites[0]] for t in self.tokens):
            raise RuntimeError('no features were recorded (was the model run inside hooks()?)')
        return {
            'sites': list(self.sites), 'kind': self.kind, 'rtol': rtol, 'variance_fraction': fraction,
            'center': center,
            'tokens': {t: [rank_summary(self.features(t, s), rtol, fraction, center) for s in self.sites]
                       for t in self.tokens},
        }
