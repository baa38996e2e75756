"""Building blocks shared by the models (timm's `layers` boundary)."""
from .apa import AGLU, APA, APA_INITS, SqueezeExcite, resolve_act_layer
from .normed_linear import COSINE_LOGIT_SCALE, NormedLinear
