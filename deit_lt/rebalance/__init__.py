"""Decoupling's classifier re-balancing (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020) for deit-lt students and CNN teachers.

The backbone stays frozen; its features are computed once and cached (`features`). Four methods share one
interface, `fit(train, heads, cfg, *, val, groups, device, seed) -> RebalanceResult` (`base`):

| method | module | what changes |
|---|---|---|
| cRT | `crt` | classifier re-initialised and re-trained with class-balanced sampling |
| tau-norm | `tau_norm` | w_j / ||w_j||^tau, tau chosen on the val split |
| LWS | `lws` | learnt per-class scales of the frozen classifier |
| NCM | `ncm` | nearest class mean on centred, L2-normalised features |

`run_rebalance(cfg)` (`runner`) runs them on a checkpoint and writes the report, plots and model files;
`tools/rebalance.py` is its command line.
"""
from .base import LinearHead, LinearResult, RebalanceResult, joint_logits, linear_head, with_average
from .config import (METHOD_NAMES, CRTConfig, FeatureConfig, HeadTrainingConfig, LWSConfig, NCMConfig,
                     RebalanceConfig, TauNormConfig, load_rebalance_config, resolve_methods)
from .features import FeatureSet, HeadSpec, extract_features, load_or_extract, model_heads
from .lws import ScaledLinear
from .ncm import NCMClassifier, NCMResult, load_ncm, save_ncm
from .report import evaluate_predictors, format_table
from .runner import METHODS, run_rebalance, save_rebalanced_model
from .tau_norm import tau_normalize
