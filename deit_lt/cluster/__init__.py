"""Imbalanced deep clustering with optimal-transport pseudo-labels: P²OT (Zhang et al., ICLR 2024) and SP²OT.

Model-independent core (exported here):

- `ot`: entropic partial OT with a virtual cluster and KL-relaxed cluster sizes (`partial_ot`, `P2OTSolver`), the
  rho and lam1 schedules; `sp2ot`: the k-NN similarity and SP²OT's majorisation-minimisation (`SP2OTSolver`);
- `losses`: swapped-prediction loss, FIFO memory bank, per-step pseudo-labels, label-free model selection score;
- `metrics`: Hungarian-matched ACC (class-mean recall), overall accuracy, NMI, ARI, macro F1, head/mid/tail
  accuracy, and a k-means baseline.

Training (`tools/cluster.py`; import the modules directly, they pull in timm and the run loop):

- `config`: `ClusterTrainConfig` (model / cluster sections on the shared data, aug, optim, runtime, W&B sections);
- `model`: `ClusterModel` (backbone frozen except its last blocks, cosine heads, `OTState` buffers),
  `create_backbone`, `load_cluster_model`;
- `recipe`: `cluster_parts` (the `deit_lt.engine.RunParts`), `train_cluster`, the evaluation hook.
"""
from .losses import MemoryBank, SwappedPredictionLoss, pseudo_labels, selection_score, swapped_prediction_loss
from .metrics import cluster_metrics, frequency_groups, hungarian_match, kmeans_clusters, remap_clusters
from .ot import OT_MODES, OTPlan, P2OTSolver, cost_from_logits, mm_weight, partial_ot, rho_schedule, sigmoid_rampup
from .sp2ot import KNNGraph, MMResult, SP2OTSolver, SparseSimilarity, knn_similarity, mm_partial_ot

__all__ = [
    'OT_MODES', 'OTPlan', 'partial_ot', 'cost_from_logits', 'P2OTSolver', 'sigmoid_rampup', 'rho_schedule',
    'mm_weight', 'SparseSimilarity', 'KNNGraph', 'knn_similarity', 'MMResult', 'mm_partial_ot', 'SP2OTSolver',
    'swapped_prediction_loss', 'SwappedPredictionLoss', 'MemoryBank', 'pseudo_labels', 'selection_score',
    'hungarian_match', 'remap_clusters', 'cluster_metrics', 'frequency_groups', 'kmeans_clusters',
]
