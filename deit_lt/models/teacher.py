"""Load a trained CNN teacher for distillation, whatever format it comes in, and adapt it to the student's batch.

Formats:
- 'deit_lt': our model files (.safetensors with deit-lt metadata): architecture, head, normalisation and input
  size come from the file.
- 'state_dict': a plain ResNet-32 / ResNet-50 state dict (.pth / .pth.tar), bare or under 'state_dict' / 'model',
  possibly with DataParallel/DDP `module.` prefixes. Saddle-LongTail / LDAM-DRW name the ResNet-32 head `linear`,
  the PaCo copy and torchvision name it `fc`; either is mapped onto the model's classifier. A cosine (LDAM) head
  is recognised by its bias-free (in_features, C) weight when `use_norm` is not given.
- 'paco': a PaCo / MoCo wrapper checkpoint (`module.encoder_q.*`, `encoder_k.*`, `linear(_k).*`, `queue*`). The
  teacher is the query encoder without its MLP projection (`encoder_q.fc.*`) plus the classifier `linear.*`:
  logits = linear(avgpool(encoder_q backbone)), exactly the wrapper's eval-mode output.

Pickled files are read with `torch.load(weights_only=True)`, so a file that carries code fails to load instead of
running it. Every failure (missing, truncated, corrupt, wrong architecture or class count) is a CheckpointError
that says what to do.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_model_file, read_model_meta
from ..errors import CheckpointError
from .factory import create_model_from_meta, load_state_dict_checked

from .cnn import create_teacher_model, display_arch, has_cosine_head
from .layers.normed_linear import COSINE_LOGIT_SCALE

__all__ = ['load_teacher', 'read_state_dict', 'TEACHER_FORMATS', 'TeacherAdapter']

TEACHER_FORMATS = ('auto', 'deit_lt', 'state_dict', 'paco')
_PACO_DROP = ('encoder_k.', 'linear_k.', 'queue', 'queue_l', 'queue_ptr')


def load_teacher(checkpoint: str | os.PathLike, *, num_classes: int, arch: str | None = None, format: str = 'auto',
                 use_norm: bool | None = None, in_chans: int = 3,
                 device: str | torch.device = 'cpu') -> tuple[nn.Module, dict[str, Any]]:
    """Build a frozen teacher from `checkpoint`.

    Args:
        checkpoint: file path (.safetensors model file, or a torch-pickled state dict / PaCo checkpoint).
        num_classes: classes of the data it will be used on; must equal the checkpoint's.
        arch: timm name; needed for plain state dicts unless it can be recognised (ResNet-32 / ResNet-50 keys).
            For our model files it is checked against the file.
        format: 'auto' | 'deit_lt' | 'state_dict' | 'paco'.
        use_norm: cosine head; None = from the file (model files) or from the head weight's layout.
        in_chans: input channels of the data (checked against the file's, or the first convolution's).
        device: where the model goes.

    Returns:
        (model in eval mode with requires_grad False, meta) where meta has at least 'arch', 'num_classes',
        'img_size' (or None), 'mean', 'std' (or None), 'use_norm', 'logit_scale' (30 for cosine heads, else 1),
        'format' and 'path'; our model files contribute all their metadata.
    """
    path = Path(checkpoint)
    if format not in TEACHER_FORMATS:
        raise ValueError(f'unknown teacher format {format!r}; choose one of {", ".join(TEACHER_FORMATS)}')
    if not path.is_file():
        raise CheckpointError(f'teacher checkpoint not found: {path}')
    if format == 'auto':
        format = _detect_format(path)
    if format == 'deit_lt':
        model, meta = _load_deit_lt(path, num_classes=num_classes, arch=arch, use_norm=use_norm, in_chans=in_chans)
    else:
        model, meta = _load_foreign(path, format, num_classes=num_classes, arch=arch, use_norm=use_norm,
                                    in_chans=in_chans)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, meta


# --------------------------------------------------------------------------------------------------------------
# Our model files
# --------------------------------------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    return path.suffix == '.safetensors'


def _detect_format(path: Path) -> str:
    if _is_safetensors(path):
        return 'deit_lt' if read_model_meta(path) is not None else 'state_dict'
    sd = read_state_dict(path)
    return 'paco' if any(k.split('module.', 1)[-1].startswith('encoder_q.') for k in sd) else 'state_dict'


def _load_deit_lt(path: Path, *, num_classes: int, arch: str | None, use_norm: bool | None,
                  in_chans: int) -> tuple[nn.Module, dict[str, Any]]:
    if not _is_safetensors(path):
        raise CheckpointError(f'{path}: deit-lt model files are .safetensors; use format=state_dict or paco for '
                              f'pickled checkpoints')
    state_dict, meta = load_model_file(path)
    if meta is None:
        raise CheckpointError(f'{path} has no deit-lt metadata; load it with format=state_dict and give arch')
    file_classes = int(meta.get('num_classes', -1))
    if file_classes != num_classes:
        raise CheckpointError(f'{path}: the teacher has {file_classes} classes but the data has {num_classes}; '
                              f'use a teacher trained on this dataset')
    file_chans = meta.get('in_chans', (meta.get('model_kwargs') or {}).get('in_chans'))
    if file_chans is not None and int(file_chans) != in_chans:
        raise CheckpointError(f'{path}: the teacher reads {file_chans}-channel images but the data has {in_chans}')
    file_arch = display_arch(meta.get('arch', ''), meta.get('model_kwargs'))
    if arch is not None and arch not in (file_arch, meta.get('arch')):
        raise CheckpointError(f'{path} holds a {file_arch!r} teacher, not {arch!r}; drop teacher.arch or fix it')
    model = create_model_from_meta(meta)
    load_state_dict_checked(model, state_dict, str(path))
    cosine = has_cosine_head(model)
    if use_norm is not None and bool(use_norm) != cosine:
        raise CheckpointError(f'{path}: use_norm={use_norm} but the file has a {"cosine" if cosine else "linear"} '
                              f'head; leave use_norm unset for model files')
    out = dict(meta)
    out.setdefault('img_size', None)
    out.setdefault('mean', None)
    out.setdefault('std', None)
    out['use_norm'] = cosine
    out.setdefault('logit_scale', COSINE_LOGIT_SCALE if cosine else 1.0)
    out.update(format='deit_lt', path=str(path))
    return model, out


# --------------------------------------------------------------------------------------------------------------
# Pickled state dicts (Saddle-LongTail, LDAM-DRW, PaCo, DeiT-LT releases)
# --------------------------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint file: `state_dict` or `model` entry, or the file's top level.

    safetensors files are read with safetensors; anything else with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if _is_safetensors(path):
        return load_model_file(path)[0]
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(e)
        if 'GLOBAL' in detail:
            raise CheckpointError(f'{path}: refusing to load: the file holds Python objects beyond tensors and plain '
                                  f'data, which could run code on load ({detail}). Re-save just the state dict '
                                  f'(torch.save(model.state_dict(), ...)) in a trusted environment') from None
        raise CheckpointError(f'{path}: cannot read the checkpoint (truncated, corrupt, or not a PyTorch '
                              f'file): {detail}') from None
    except Exception as e:  # noqa: BLE001 - random bytes fail in arbitrary ways (EOFError, IndexError, ...)
        raise CheckpointError(f'{path}: cannot read the checkpoint (truncated or corrupt?): '
                              f'{type(e).__name__}: {_first_line(e)}') from None
    if isinstance(obj, dict):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{path}: no state dict found (expected a dict of tensors, or one under '
                              f'"state_dict" / "model")')
    return obj


def _unpickling_detail(e: Exception) -> str:
    """The informative line of torch's weights-only error (the blocked GLOBAL or the unsupported opcode)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if 'GLOBAL' in ln or 'Unsupported' in ln or 'invalid load key' in ln:
            return ln[:300]
    return _first_line(e)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        while k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out


def _paco_to_plain(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Query encoder without its projection MLP, plus the classifier `linear.*` (as head `fc.*` for now)."""
    out = {}
    for k, v in sd.items():
        if k.startswith('encoder_q.'):
            k = k[len('encoder_q.'):]
            if not k.startswith('fc.'):
                out[k] = v
        elif k.startswith('linear.'):
            out['__head__.' + k[len('linear.'):]] = v
        elif not k.startswith(_PACO_DROP):
            raise CheckpointError(f'{path}: unexpected key {k!r} in a PaCo checkpoint (expected encoder_q / '
                                  f'encoder_k / linear / linear_k / queue*)')
    if not any(k.startswith('__head__.') for k in out):
        raise CheckpointError(f'{path}: PaCo checkpoint without a classifier (no linear.* keys)')
    return out


def _plain_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mark the head keys (`linear.*` or `fc.*`) so they can be renamed to the model's classifier."""
    heads = {k.split('.', 1)[0] for k in sd if k.split('.', 1)[0] in ('linear', 'fc') and k.count('.') == 1}
    if len(heads) > 1:
        raise CheckpointError(f'state dict has both linear.* and fc.* heads: {sorted(heads)}; which is the '
                              f'classifier is ambiguous')
    if not heads:
        return sd
    head = heads.pop()
    return {('__head__.' + k[len(head) + 1:]) if k.startswith(head + '.') else k: v for k, v in sd.items()}


def _guess_arch(sd: dict[str, torch.Tensor]) -> str | None:
    if 'layer4.2.conv3.weight' in sd and 'layer3.5.conv3.weight' in sd and 'layer3.6.conv1.weight' not in sd:
        return 'resnet50'
    if 'layer3.4.conv2.weight' in sd and 'layer3.5.conv1.weight' not in sd and 'layer4.0.conv1.weight' not in sd:
        return 'resnet32'
    return None


def _head_layout(sd: dict[str, torch.Tensor]) -> tuple[int, bool]:
    """(number of classes, cosine head?) from the head weight: nn.Linear is (C, d) with a bias, NormedLinear is
    (d, C) without one."""
    w = sd.get('__head__.weight')
    if w is None or w.ndim != 2:
        raise CheckpointError('the state dict has no 2-D classifier weight (linear.weight or fc.weight)')
    cosine = '__head__.bias' not in sd
    return (int(w.shape[1]) if cosine else int(w.shape[0])), cosine


def _load_foreign(path: Path, format: str, *, num_classes: int, arch: str | None, use_norm: bool | None,
                  in_chans: int) -> tuple[nn.Module, dict[str, Any]]:
    sd = _strip_module(read_state_dict(path))
    if format == 'paco':
        if not any(k.startswith('encoder_q.') for k in sd):
            raise CheckpointError(f'{path}: format=paco but there are no encoder_q.* keys')
        sd = _paco_to_plain(sd, path)
        if use_norm:
            raise CheckpointError(f'{path}: PaCo classifiers are linear; use_norm=true does not apply')
    else:
        sd = _plain_head(sd)
    arch = arch or _guess_arch(sd)
    if arch is None:
        raise CheckpointError(f'{path}: cannot tell the architecture from the keys; pass arch (e.g. resnet32, '
                              f'resnet50)')
    file_classes, cosine = _head_layout(sd)
    if use_norm is None:
        use_norm = cosine
    if file_classes != num_classes:
        raise CheckpointError(f'{path}: the teacher has {file_classes} classes but the data has {num_classes}; '
                              f'use a teacher trained on this dataset')
    try:
        model, registry_arch, model_kwargs = create_teacher_model(arch, num_classes, use_norm=bool(use_norm),
                                                                  in_chans=in_chans)
    except ValueError as e:
        raise CheckpointError(f'{path}: {e}') from None
    head_name = _classifier_name(model)
    sd = {(head_name + k[len('__head__'):]) if k.startswith('__head__.') else k: v for k, v in sd.items()}
    load_state_dict_checked(model, sd, f'{path} ({format}, arch={arch}, use_norm={bool(use_norm)})')
    meta = {
        'kind': 'teacher', 'arch': registry_arch, 'model_kwargs': model_kwargs, 'num_classes': num_classes,
        'img_size': None, 'in_chans': in_chans, 'mean': None, 'std': None, 'use_norm': bool(use_norm),
        'logit_scale': COSINE_LOGIT_SCALE if use_norm else 1.0, 'format': format, 'path': str(path),
    }
    return model, meta


def _classifier_name(model: nn.Module) -> str:
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if not name:
        raise CheckpointError(f'{type(model).__name__} does not name its classifier; cannot map the head weights')
    return name


# --------------------------------------------------------------------------------------------------------------
# The teacher inside a student run
# --------------------------------------------------------------------------------------------------------------

class TeacherAdapter(nn.Module):
    """A frozen teacher that reads the student's input batch.

    The batch is resized to the teacher's input size (bicubic, no antialiasing: what torchvision 0.15's tensor
    Resize did in the official code), re-normalised when the teacher was trained with another mean/std, and put in
    channels-last memory format on GPU. Teacher logits can be scaled (for soft distillation of an LDAM teacher,
    whose cosine head outputs cosines) and permuted into the student's sorted label space (`class_map`). A
    multi-expert teacher gives its ensemble logits, or with `routed` those of the experts its router selects.
    """

    def __init__(self, model: nn.Module, img_size: int | None, student_norm: tuple[Sequence[float], Sequence[float]],
                 teacher_norm: tuple[Sequence[float], Sequence[float]] | None = None, logit_scale: float = 1.0,
                 class_map: Sequence[int] | None = None, channels_last: bool = False, routed: bool = False):
        super().__init__()
        if routed and getattr(model, 'router', None) is None:
            raise CheckpointError(f'{type(model).__name__} has no expert router: routed teacher inference needs a '
                                  f'multi-expert teacher trained with a router (teacher.routed=false otherwise)')
        self.routed = routed
        self.model = model.eval().requires_grad_(False)
        self.img_size = img_size
        self.logit_scale = logit_scale
        s_mean, s_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in student_norm)
        self.renorm = teacher_norm is not None and (list(teacher_norm[0]) != list(student_norm[0]) or
                                                    list(teacher_norm[1]) != list(student_norm[1]))
        t_mean, t_std = ((torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in teacher_norm)
                         if self.renorm else (s_mean, s_std))
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t as one affine map
        self.register_buffer('scale', s_std / t_std, persistent=False)
        self.register_buffer('shift', (s_mean - t_mean) / t_std, persistent=False)
        if class_map is not None:
            # class_map[original id] = student label; column r of the student-space logits is original id of rank r
            self.register_buffer('perm', torch.argsort(torch.as_tensor(class_map)), persistent=False)
        else:
            self.perm = None
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):  # the teacher stays in eval mode (BatchNorm running statistics)
        return super().train(False)

    @torch.no_grad()  # not inference_mode: the result feeds the student's loss, which is differentiated
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode='bicubic', align_corners=False,
                              antialias=False)
        if self.renorm:
            x = x * self.scale + self.shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = (self.model.forward_routed(x)[0] if self.routed else self.model(x)).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.perm is not None:
            logits = logits[:, self.perm]
        return logits
