"""The analyses of DeiT-LT (Rangwani et al., CVPR 2024) as a library, for any deit-lt checkpoint.

| analysis | module | what it measures |
|---|---|---|
| attention | `attention` | mean attention distance per block and head (ViT paper, app. D.7), from the model's blocks |
| rank | `rank` | numerical / variance rank and singular-value spectrum of CLS and DIST features at every block |
| expertise | `expertise` | CLS / DIST / AVG accuracy per split and class, CLS-DIST and DIST-teacher agreement |
| geometry | `geometry` | per-class classifier weight norm against training count, every head (Decoupling's picture) |
| calibration | `calibration` | reliability diagram bins and ECE per head |

`run_analysis(cfg)` (`runner`) runs them over one or more checkpoints and writes the figures (`plots`), one JSON
report and W&B; `tools/analyze.py` is its command line.
"""
from .attention import (AttentionDistanceMeter, attention_hooks, attention_modules, mean_attention_distance,
                        patch_centres, patch_distances)
from .calibration import calibration_report, reliability_bins
from .config import (ANALYSES, AnalysisConfig, AnalysisError, load_analysis_config, resolve_analyses,
                     resolve_checkpoint)
from .expertise import agreement, expertise_report, predictor_accuracy
from .geometry import classifier_norms, head_role, spearman
from .rank import FeatureRecorder, numerical_rank, rank_summary, singular_values, variance_rank
from .runner import analyse_checkpoint, flat_scalars, predictor_logits, run_analysis
