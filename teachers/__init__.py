"""Teacher training for DeiT-LT: the CE / LDAM + DRW losses, SAM and its schedules, and the teacher recipe.

The CNNs themselves (ResNet-32, cosine heads on any timm CNN) and the loading of trained teachers live in
`deit_lt.models`, because a student run needs them; this package only trains them. Imports go one way:
`teachers` -> `deit_lt`.
"""
from .config import TeacherTrainConfig, validate_config
from .losses import TeacherLoss, ldam_margins

__all__ = ['TeacherLoss', 'TeacherTrainConfig', 'ldam_margins', 'train_teacher', 'validate_config']


def __getattr__(name: str):
    if name == 'train_teacher':
        from .recipe import train_teacher
        return train_teacher
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
