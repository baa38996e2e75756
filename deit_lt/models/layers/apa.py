"""APA and AGLU: the adaptive parametric activation, and the squeeze-and-excitation gate it was published in.

Alexandridis, Deng, Nguyen, Luo, "Adaptive Parametric Activation", ECCV 2024 (arXiv 2407.08567); official code
kostas1515/AGLU@ed45253ea23421bf1ef5f78773b4a28d433fa620 (paths below are relative to that commit).

    APA(z; kappa, lambda) = (1 + lambda * exp(-kappa * z)) ** (-1 / lambda),    lambda > 0
    AGLU(z) = z * APA(z)

lambda = 1 gives sigmoid(kappa * z) (with kappa = 1, AGLU is SiLU; with kappa = 1.702, the sigmoid approximation of
GELU); lambda -> 0 gives the Gumbel CDF exp(-exp(-kappa * z)); kappa -> +inf makes APA a step and AGLU a ReLU.
APA is the gate of attention blocks (in place of the sigmoid), AGLU the activation of intermediate layers.

Both are evaluated in the numerically stable form of the official code,

    APA = exp(g(kappa * z - ln lambda) / lambda),    g(s) = -softplus(-s) = -ln(1 + exp(-s)),

which never forms exp(-kappa * z) (it overflows for large negative kappa * z) and stays accurate for lambda near
its floor. Gradients come from autograd. The official `UniRect_static.backward`
(classification/resnet_cifar.py:68-93) returns -z * APA / (lambda * D) for the lambda-gradient, D = exp(kappa z) +
lambda, and drops the term + APA * ln(1 + lambda exp(-kappa z)) / lambda**2, so its sign can be wrong; it is not
reproduced here (tests/test_apa.py checks the exact gradient against the closed forms and finite differences).

The official code has four parameter variants that differ in initialisation and in how lambda is kept positive
(`APA_INITS`); each module takes the variant by name, and the defaults follow the use the paper made of it:
AGLU replacing the ReLUs of a ResNet ('resnet'), APA as an SE gate ('attention'), AGLU as the MLP activation of a
transformer ('swin'). kappa and lambda are exempt from weight decay (the official train.py:373-381 gives them 0
through `custom_keys_weight_decay`; here through `no_weight_decay_names`, honoured by `deit_lt.optim`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import nn

__all__ = ['APA', 'AGLU', 'ApaInit', 'APA_INITS', 'LAMBDA_CONSTRAINTS', 'SqueezeExcite', 'apa', 'aglu',
           'resolve_act_layer']


def apa(z: torch.Tensor, kappa: torch.Tensor, lambda_: torch.Tensor) -> torch.Tensor:
    """APA(z; kappa, lambda) in the stable form exp(-softplus(ln lambda - kappa z) / lambda).

    Args:
        z: input, any shape.
        kappa: slope, broadcastable to `z`.
        lambda_: shape parameter, broadcastable to `z`; must already be positive (the modules apply the
            constraint before calling this).

    Returns:
        APA(z) with the broadcast shape, in the promoted dtype of the arguments.
    """
    # g(s) = -softplus(-s) with s = kappa z - ln lambda. PyTorch's softplus returns its argument unchanged above 20,
    # which is exact to float precision there, and computes log1p(exp(.)) below, so tiny lambda keeps its accuracy.
    return torch.exp(-F.softplus(torch.log(lambda_) - kappa * z) / lambda_)


def aglu(z: torch.Tensor, kappa: torch.Tensor, lambda_: torch.Tensor) -> torch.Tensor:
    """AGLU(z) = z * APA(z; kappa, lambda); arguments as for `apa`."""
    return z * apa(z, kappa, lambda_)


def _clamp_lambda(lambda_: torch.Tensor) -> torch.Tensor:
    # `Unified` (classification/resnet_cifar.py:37-63): clamp at 1e-4. Its gradient is zero below the floor, so a
    # lambda pushed under 1e-4 stays there until the loss pushes it back up (the official behaviour, kept).
    return lambda_.clamp(min=1e-4)


def _relu_lambda(lambda_: torch.Tensor) -> torch.Tensor:
    # `UniRect` (classification/resnet_cifar.py:96-123): ReLU(lambda) + 1e-8. A negative lambda gets zero gradient
    # and is frozen at the Gumbel limit; kept because it is what the published networks trained with.
    return F.relu(lambda_) + 1e-8


LAMBDA_CONSTRAINTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'clamp': _clamp_lambda,
    'relu': _relu_lambda,
}


@dataclass(frozen=True)
class ApaInit:
    """One parameter variant of the official code: uniform init ranges and the constraint that keeps lambda > 0.

    Args:
        lambda_range: (low, high) of the uniform init of lambda.
        kappa_range: (low, high) of the uniform init of kappa.
        lambda_constraint: key of `LAMBDA_CONSTRAINTS`.
    """

    lambda_range: tuple[float, float]
    kappa_range: tuple[float, float]
    lambda_constraint: str


APA_INITS: dict[str, ApaInit] = {
    # AGLU replacing each ReLU of the classification ResNets: `UniRect`, classification/resnet_cifar.py:96-123
    # (the same in classification/resnet_pytorch.py:107-134).
    'resnet': ApaInit((0.0, 1.0), (0.8, 1.2), 'relu'),
    # APA gate of the SE / CBAM blocks: `Unified`, classification/resnet_cifar.py:37-63. kappa starts negative, so
    # the gate initially decreases with its input (the official comment: "works well with this init").
    'attention': ApaInit((0.0, 1.0), (-1.0, 0.0), 'clamp'),
    # The detection SE-ResNet: `UniRect`, mmdetection_v3.2/mmdet/models/backbones/se_resnet.py:48-77.
    'detection': ApaInit((0.0, 1.0), (1.0, 1.3), 'clamp'),
    # The Swin FFN activation: `UniRect`, mmdetection_v3.2/mmdet/models/backbones/swin.py:52-79. Used for the
    # MLP of a ViT, the closest upstream counterpart (there is no ViT model upstream).
    'swin': ApaInit((0.1, 1.0), (0.0, 1.0), 'relu'),
    # The snippet of the repository README: lambda, kappa ~ U(0, 1), clamp at 1e-4.
    'readme': ApaInit((0.0, 1.0), (0.0, 1.0), 'clamp'),
}


class APA(nn.Module):
    """Adaptive parametric activation, APA(z) = (1 + lambda exp(-kappa z)) ** (-1 / lambda), with learnable kappa
    and lambda.

    Inputs of half precision are evaluated in float32 and the result cast back: 1 / lambda amplifies the rounding
    error of bf16 / fp16 (the official README asks for fp32 evaluation under AMP).

    Args:
        num_parameters: 1 for one scalar kappa and lambda (every published network), or the number of channels
            for one pair per channel.
        init: name of the parameter variant in `APA_INITS` ('attention' by default: APA as a gate).
        channel_dim: dimension of the input that holds the channels when `num_parameters > 1` (1 for NCHW / NC,
            -1 for the tokens of a transformer, NLC).
        lambda_range: overrides the init range of lambda of the variant.
        kappa_range: overrides the init range of kappa of the variant.
        lambda_constraint: overrides the constraint of the variant ('clamp' or 'relu').
        inplace: accepted for timm's `act_layer(inplace=True)` convention and ignored: the backward needs the
            input, so the activation never overwrites it.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    # deit_lt.optim reads this: kappa and lambda are trained without weight decay, as in the official recipes.
    no_weight_decay_names = ('kappa', 'lambda_')
    default_init = 'attention'

    def __init__(self, num_parameters: int = 1, init: str | None = None, *, channel_dim: int = 1,
                 lambda_range: tuple[float, float] | None = None, kappa_range: tuple[float, float] | None = None,
                 lambda_constraint: str | None = None, inplace: bool = False, device=None, dtype=None):
        super().__init__()
        init = init or self.default_init
        if init not in APA_INITS:
            raise ValueError(f'unknown APA init {init!r}; choose one of {sorted(APA_INITS)}')
        variant = APA_INITS[init]
        constraint = lambda_constraint or variant.lambda_constraint
        if constraint not in LAMBDA_CONSTRAINTS:
            raise ValueError(f'unknown lambda constraint {constraint!r}; choose one of {sorted(LAMBDA_CONSTRAINTS)}')
        if num_parameters < 1:
            raise ValueError(f'num_parameters must be >= 1, got {num_parameters}')
        self.num_parameters = num_parameters
        self.init = init
        self.channel_dim = channel_dim
        self.lambda_range = tuple(lambda_range or variant.lambda_range)
        self.kappa_range = tuple(kappa_range or variant.kappa_range)
        self.lambda_constraint = constraint
        self._constrain = LAMBDA_CONSTRAINTS[constraint]
        # Stored as 1-D vectors (scalar case: shape (1,), as the official modules) and reshaped at use, so that the
        # state dict is the same for NCHW and NLC inputs.
        self.kappa = nn.Parameter(torch.empty(num_parameters, device=device, dtype=dtype))
        self.lambda_ = nn.Parameter(torch.empty(num_parameters, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The official modules draw each entry independently from its uniform range.
        self.kappa.uniform_(*self.kappa_range)
        self.lambda_.uniform_(*self.lambda_range)

    def effective_lambda(self) -> torch.Tensor:
        """lambda after the positivity constraint, as used in the forward pass."""
        return self._constrain(self.lambda_)

    def _params_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kappa, lambda_ = self.kappa, self.effective_lambda()
        if self.num_parameters > 1:
            dim = self.channel_dim % x.ndim
            if x.shape[dim] != self.num_parameters:
                raise ValueError(f'{type(self).__name__} has {self.num_parameters} channels but the input has '
                                 f'{x.shape[dim]} at dim {dim}')
            shape = [1] * x.ndim
            shape[dim] = self.num_parameters
            kappa, lambda_ = kappa.view(shape), lambda_.view(shape)
        return kappa.to(x.dtype), lambda_.to(x.dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise APA; same shape and dtype as `x`."""
        z = x.to(self._compute_dtype(x))
        return apa(z, *self._params_for(z)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f'num_parameters={self.num_parameters}, init={self.init!r}, '
                f'lambda_constraint={self.lambda_constraint!r}')


class AGLU(APA):
    """Adaptive generalised linear unit, AGLU(z) = z * APA(z; kappa, lambda): the paper's replacement of ReLU /
    GELU in intermediate layers.

    Arguments as for `APA`; the default init is 'resnet' (AGLU replacing the ReLUs of a ResNet). Pass
    init='swin' for the MLP of a transformer.
    """

    default_init = 'resnet'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise AGLU; same shape and dtype as `x`."""
        z = x.to(self._compute_dtype(x))
        return aglu(z, *self._params_for(z)).to(x.dtype)


def resolve_act_layer(act_layer: str | Callable[..., nn.Module] | None, **kwargs: Any) -> Callable[..., nn.Module]:
    """An activation-layer constructor from a name or class: 'aglu' -> `AGLU`, other names through timm.

    Model configs and checkpoint metadata hold names (JSON), while the networks need constructors.

    Args:
        act_layer: 'aglu', any timm activation name ('relu', 'gelu', ...), a class, or None ('relu').
        **kwargs: bound to the constructor (for AGLU: init, num_parameters, lambda_constraint, ...).

    Returns:
        A callable that builds one activation module per call.
    """
    if act_layer is None:
        act_layer = 'relu'
    if isinstance(act_layer, str):
        layer = AGLU if act_layer.lower() == 'aglu' else get_act_layer(act_layer)
    else:
        layer = act_layer
    return partial(layer, **kwargs) if kwargs else layer


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation in the form of the APA code, with a sigmoid or an APA gate.

    x * gate(fc2(relu(fc1(norm(mean_hw(x)))))), both Linear layers without bias (`SE_Block`,
    classification/resnet_cifar.py:216-249 and classification/resnet_pytorch.py:535-569). With the APA gate the
    official code adds a LayerNorm on the pooled vector and Dropout(0.1) on the gate's input; with the sigmoid it
    has neither. `norm` and `drop_rate` default to that per-gate form. The ReLU of the bottleneck stays a ReLU.

    Args:
        channels: input and output channels C.
        reduction: the hidden width is C // reduction (4 for CIFAR, 16 for ImageNet in the official code).
        gate: 'sigmoid' or 'apa'.
        norm: LayerNorm on the pooled vector (None: only with the APA gate).
        drop_rate: dropout before the gate (None: 0.1 with the APA gate, else 0).
        gate_kwargs: arguments of the APA gate (init, num_parameters, ...); the default is the 'attention' init
            with one scalar kappa and lambda, as every official block.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(self, channels: int, reduction: int = 4, gate: str = 'sigmoid', norm: bool | None = None,
                 drop_rate: float | None = None, gate_kwargs: dict[str, Any] | None = None, device=None, dtype=None):
        super().__init__()
        if gate not in ('sigmoid', 'apa'):
            raise ValueError(f"SE gate must be 'sigmoid' or 'apa', got {gate!r}")
        if channels // reduction < 1:
            raise ValueError(f'SE reduction {reduction} leaves no hidden channel for {channels} channels')
        dd = dict(device=device, dtype=dtype)
        use_apa = gate == 'apa'
        norm = use_apa if norm is None else norm
        drop_rate = (0.1 if use_apa else 0.0) if drop_rate is None else drop_rate
        self.gate_type = gate
        self.norm = nn.LayerNorm(channels, **dd) if norm else nn.Identity()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False, **dd)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False, **dd)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.gate = APA(**dict(dict(init='attention'), **(gate_kwargs or {})), **dd) if use_apa else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), each channel scaled by its gate in [0, 1]."""
        y = self.norm(x.mean((2, 3)))
        y = self.drop(self.fc2(self.act(self.fc1(y))))
        return x * self.gate(y)[:, :, None, None]
