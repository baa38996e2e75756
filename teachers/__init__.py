"""CNN teachers for DeiT-LT: models, losses, SAM training and checkpoint loading.

Importing the package registers the teacher models in timm (`resnet32`, and `cosine_cnn` for cosine heads on any
timm CNN), which `deit_lt.models.factory` relies on to rebuild teacher checkpoints. The training entry point
(`train_teacher`, heavier imports) loads on first use.
"""
from .config import TeacherTrainConfig, validate_config
from .factory import cosine_cnn, create_teacher_model
from .loading import load_teacher, read_state_dict
from .losses import TeacherLoss, ldam_margins
from .normed_linear import COSINE_LOGIT_SCALE, NormedLinear
from .resnet_cifar import ResNetCifar

__all__ = ['COSINE_LOGIT_SCALE', 'NormedLinear', 'ResNetCifar', 'TeacherLoss', 'TeacherTrainConfig', 'cosine_cnn',
           'create_teacher_model', 'ldam_margins', 'load_teacher', 'read_state_dict', 'train_teacher',
           'validate_config']


def __getattr__(name: str):
    if name == 'train_teacher':
        from .train import train_teacher
        return train_teacher
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
