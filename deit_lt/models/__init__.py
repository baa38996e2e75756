"""Models: students and CNN teachers registered in timm, teacher loading, and rebuilding any model from a checkpoint."""
from . import cnn, deit, resnet_cifar  # noqa: F401  (register the students, the CIFAR ResNets and cosine_cnn in timm)
from .factory import create_model_from_checkpoint, create_model_from_meta, is_distilled, model_outputs
