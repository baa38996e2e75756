"""Batched, per-sample training augmentation on the device (the 'device' placement's fast path).

The DeiT / DeiT-LT recipe augments every image on the CPU with PIL through timm's
``create_transform(is_training=True)`` (timm/data/transforms_factory.py)::

    RandomResizedCropAndInterpolation -> RandomHorizontalFlip -> RandAugment ('rand-m9-mstd0.5-inc1')
    -> ToTensor -> Normalize -> RandomErasing (p 0.25, 'pixel', 1 box)

Small datasets (CIFAR, digits) are kept decoded on the device as one uint8 tensor, so this module computes the
same augmentation family with the same strength for a whole batch at once: every sample draws its own crop,
flip, RandAugment ops, magnitudes and erasing boxes, there is no Python loop over the batch and no host
synchronisation (no ``.item()``, no boolean-mask indexing, no ``.cpu()``), so it can run inside a training step.

Why our own code instead of the field's libraries:
- timm's RandAugment (timm/data/auto_augment.py) is PIL-only (per image, on the CPU).
- kornia's ``RandAugment`` draws the ops once per batch (only the sign varies per sample), uses its own
  magnitude scale without magnitude noise and an additive brightness, so it is not timm's 'rand-m9-mstd0.5-inc1'
  (checked with kornia 0.9); torchvision v2 draws one parameter set per call.
timm itself still parses the RandAugment spec (``rand_augment_transform``), so the op set, probabilities,
magnitudes and hparams are timm's; we only re-implement the per-op pixel maths, batched.

How PIL is mirrored (all images stay in the uint8 value range, as float32 holding integers, and every op
re-quantises exactly where PIL does):
- crop + resize (``Image.resize`` after ``crop``, Pillow's Resample.c): the separable, antialiased convolution is
  written as one (out, in) weight matrix per axis and sample (PIL's coefficient rule: bicubic a=-0.5 or
  triangle, support widened when downscaling, taps limited to the crop box, normalised), applied with two
  batched matmuls; rounding after the horizontal and after the vertical pass, like PIL's two uint8 passes. The
  horizontal flip is folded into the column matrix.
- point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast) become a
  per-sample, per-channel 256-entry lookup table (PIL's own LUT formulas, incl. ``Image.blend``'s float32
  truncation), applied with one gather.
- Color / Sharpness (``ImageEnhance``): blend with the ITU-R 601 grey image (PIL's fixed-point L conversion) or
  the 3x3 SMOOTH-filtered image (border pixels kept), truncated like ``Image.blend``.
- geometric ops (Rotate, ShearX/Y, TranslateX/Y[Rel]): one affine matrix per sample mapping output pixel
  centres to input coordinates (Pillow's ``Image.transform`` convention), sampled with Pillow's Geometry.c
  kernels (bicubic with a=-1 or bilinear, edge-clamped taps, points outside the image take the fill colour
  ``img_mean``), truncated to uint8.
On the CPU every op and the resize reproduce Pillow 12 bit for bit on real images (tests/test_gpu_aug.py): the
resize uses Pillow's fixed-point coefficients with exact float64 sums, and geometric ops interpolate in float64
(``precise=True``; float32 puts ~0.01-4% of a warped image's pixels one level lower). What can still differ is
float contraction (fused multiply-adds, e.g. under torch.compile on the GPU), which can move a value that sits
exactly on a quantisation boundary by one uint8 level.

Random erasing follows timm/data/random_erasing.py (area 0.02-1/3 of the image divided by the box count,
log-uniform aspect 0.3-3.33, 10 attempts per box, 'pixel' / 'rand' / 'const' fills), with masks built by
broadcasting.

Randomness: ``DeviceAugment.sample_params`` draws everything from one ``torch.Generator`` (reproducible step by
step); ``DeviceAugment.apply`` is deterministic given the parameters, so it is the part to ``torch.compile``.
"""
from ._common import resolve_channel_stats
from .erasing import apply_erasing, sample_erasing
from .randaugment import GEOMETRIC_OPS, SUPPORTED_OPS, BatchedRandAugment, apply_ops, level_to_arg
from .resize import resample, resize_weights, sample_rrc_boxes
from .transforms import DeviceAugment, DeviceEvalTransform

__all__ = [
    'DeviceAugment', 'DeviceEvalTransform', 'BatchedRandAugment', 'GEOMETRIC_OPS', 'SUPPORTED_OPS', 'apply_ops',
    'level_to_arg', 'resize_weights', 'resample', 'sample_rrc_boxes', 'sample_erasing', 'apply_erasing',
    'resolve_channel_stats',
]
