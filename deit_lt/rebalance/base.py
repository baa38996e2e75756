"""The interface every re-balancing method shares.

Each method module exposes `fit(train, heads, cfg, *, val=None, groups=None, device='cpu', seed=0)` that takes the
cached training features, the model's heads (`features.HeadSpec`) and its config section, and returns a
`RebalanceResult`: something that turns cached features into logits per predictor, plus a JSON-able `info` record
of what it chose (taus, scales, epochs). cRT, tau-norm and LWS all end as plain linear heads (`LinearResult`), which
is what lets them be saved as ordinary model files; NCM keeps class means (`ncm.NCMResult`).

Predictors: a distilled student has 'cls', 'dist' and 'avg' = (z_cls + z_dist) / 2 (raw logits averaged, as
DeiT-LT reports); a single-head model has 'logits'.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .features import FeatureSet, HeadSpec

__all__ = ['LinearHead', 'RebalanceResult', 'LinearResult', 'with_average', 'joint_logits', 'linear_head',
           'select_heads']


@dataclasses.dataclass
class LinearHead:
    """A linear classifier on one cached feature: logits = f @ weight.T + bias.

    Attributes:
        weight: (C, d).
        bias: (C,) or None (no bias term, e.g. tau-norm's dropped bias).
        feature: the `FeatureSet` entry it reads.
        module_name: the model's head it replaces (state-dict prefix).
    """
    weight: torch.Tensor
    bias: torch.Tensor | None
    feature: str
    module_name: str

    def logits(self, feats: FeatureSet) -> torch.Tensor:
        x = feats.features[self.feature]
        b = None if self.bias is None else self.bias.to(x.device)
        return F.linear(x, self.weight.to(x.device), b)

    def cpu(self) -> 'LinearHead':
        return LinearHead(self.weight.detach().float().cpu(), None if self.bias is None else
                          self.bias.detach().float().cpu(), self.feature, self.module_name)


def with_average(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the 'avg' predictor when both 'cls' and 'dist' are present."""
    if 'cls' in logits and 'dist' in logits:
        logits = dict(logits, avg=(logits['cls'] + logits['dist']) / 2)
    return logits


def joint_logits(heads: list[HeadSpec], feats: FeatureSet) -> dict[str, torch.Tensor]:
    """Predictors of the unchanged (jointly trained) model on cached features."""
    return with_average({h.name: h.logits(feats) for h in heads})


def linear_head(spec: HeadSpec, method: str) -> LinearHead:
    """The stage-1 head as a `LinearHead`; methods that rescale the stage-1 classifier need it to be nn.Linear."""
    if not spec.is_linear:
        raise ConfigError(
            f'{method} rescales the stage-1 linear classifier, but head {spec.module_name!r} is a '
            f'{type(spec.module).__name__}, not nn.Linear (a cosine/LDAM head?). Use crt or ncm, which only need '
            f'the features.')
    m = spec.module
    return LinearHead(m.weight.detach().float().cpu().clone(),
                      None if m.bias is None else m.bias.detach().float().cpu().clone(), spec.feature,
                      spec.module_name)


def select_heads(heads: list[HeadSpec], names: list[str] | None, option: str) -> list[HeadSpec]:
    """The heads named by a method's `heads` option (all when None); an unknown name is an error."""
    if names is None:
        return list(heads)
    known = [h.name for h in heads]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f'{option}={names!r}: this model\'s heads are {", ".join(known)}')
    return [h for h in heads if h.name in names]


class RebalanceResult(abc.ABC):
    """A fitted re-balanced classifier."""

    method: str
    info: dict[str, Any]

    @abc.abstractmethod
    def logits(self, feats: FeatureSet) -> dict[str, torch.Tensor]:
        """Predictor name -> (N, C) logits on cached features."""


class LinearResult(RebalanceResult):
    """Linear heads that replace (some of) the model's heads; the others stay as they were.

    Args:
        method: 'crt', 'tau_norm' or 'lws'.
        heads: predictor name -> new head, for every head of the model (unchanged heads included).
        info: JSON-able record of the fit.
    """

    def __init__(self, method: str, heads: Mapping[str, LinearHead], info: dict[str, Any]):
        self.method = method
        self.heads = {k: h.cpu() for k, h in heads.items()}
        self.info = info

    def logits(self, feats: FeatureSet) -> dict[str, torch.Tensor]:
        return with_average({name: h.logits(feats) for name, h in self.heads.items()})
