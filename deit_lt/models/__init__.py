"""Models: students and CNN teachers registered in timm, teacher loading, and rebuilding any model from a checkpoint."""
# importing these registers every architecture of the project in timm's registry (create_model_from_meta needs it)
from . import cnn, deit, multi_expert, resnet_apa, resnet_cifar, shike  # noqa: F401
from .factory import create_model_from_checkpoint, create_model_from_meta, is_distilled, model_outputs
