"""Student models (registered in timm) and building any model back from a deit-lt checkpoint."""
from . import deit  # noqa: F401  (registers the small-image students in timm's registry)
from .factory import create_model_from_checkpoint, create_model_from_meta, is_distilled, model_outputs
