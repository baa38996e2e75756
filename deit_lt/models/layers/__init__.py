"""Building blocks shared by the models (timm's `layers` boundary)."""
from .normed_linear import COSINE_LOGIT_SCALE, NormedLinear
