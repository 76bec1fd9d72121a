"""The official ANP noisy layers, and the swap that puts them into any model.

Each neuron holds ``neuron_mask`` m (init 1), ``neuron_noise`` delta and ``neuron_noise_bias``
xi (init 0), as parameters. Perturbed, a layer computes its own function with scale
``gamma * (m + delta)`` and shift ``beta * (1 + xi)``; unperturbed, with ``gamma * m`` and ``beta``:

- BatchNorm (the official ``NoisyBatchNorm2d``): everything else (batch or running statistics,
  their update in training mode) is exactly ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``;
- LayerNorm: ``F.layer_norm`` over the last axis, or over the channels of NCHW for ConvNeXt's
  LayerNorm2d (moved last and back, as torchvision does);
- Conv/Linear (the paper's Eq. 3): the layer's own convolution or matmul with the weight
  ``W_k * (m_k + delta_k)`` and bias ``b_k * (1 + xi_k)`` of each output channel k;
- every other norm layer ANP masks (GroupNorm, timm's norm-act layers and LayerNorms, RMS norms,
  any subclass with its own forward): the layer's own forward, called with
  ``weight * (m + delta)`` and ``bias * (1 + xi)`` in place of its parameters.

Which layers are swapped is :func:`fastpurify.neurons.neuron_layers`' rule, shared with the fast
engine so that both mask the same neurons in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..neurons import DEFAULT_KINDS, layer_kind, layer_norm_axis, neuron_layers
from ..substitution import call_with_affine


class _Noisy:
    """Mixed into a layer: the three per-neuron ANP parameters and the perturbed scale and shift."""

    def _init_noisy(self) -> None:
        w = self.weight
        self.neuron_mask = nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype))
        self.neuron_noise = nn.Parameter(torch.zeros_like(self.neuron_mask))
        self.neuron_noise_bias = nn.Parameter(torch.zeros_like(self.neuron_mask))
        self.perturbed = False

    def _scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.perturbed:
            scale = self.neuron_mask + self.neuron_noise
            bias = getattr(self, "bias", None)
            shift = None if bias is None else bias * (1.0 + self.neuron_noise_bias)
        else:
            scale, shift = self.neuron_mask, getattr(self, "bias", None)
        return scale, shift


class _NoisyBatchNorm(_Noisy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_noisy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        scale, bias = self._scale_and_shift()
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if tracked else None, self.running_var if tracked else None,
                            self.weight * scale, bias, use_batch_stats, factor, self.eps)


class NoisyBatchNorm1d(_NoisyBatchNorm, nn.BatchNorm1d):
    pass


class NoisyBatchNorm2d(_NoisyBatchNorm, nn.BatchNorm2d):
    pass


class NoisyLayerNorm(_Noisy, nn.LayerNorm):
    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_and_shift()
        if self.channel_dim == 1:
            x = x.movedim(1, -1)
        y = F.layer_norm(x, self.normalized_shape, self.weight * scale, bias, self.eps)
        return y.movedim(-1, 1) if self.channel_dim == 1 else y


class _NoisyOutputs(_Noisy):
    def _weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale, bias = self._scale_and_shift()
        return self.weight * scale.view(-1, *(1,) * (self.weight.dim() - 1)), bias


class NoisyConv(_NoisyOutputs):
    """Mixed into nn.Conv1d/2d/3d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self._weight_and_bias())


class NoisyLinear(_NoisyOutputs, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._weight_and_bias())


class NoisyOwnForward(_Noisy):
    """Mixed into any other norm class: its own forward (``_own_forward``) with the noisy scale and shift."""

    _own_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_and_shift()
        return call_with_affine(self, self._own_forward, x, self.weight * scale, bias)


_OWN_FORWARD: dict[type, type] = {}


def _own_forward_class(cls: type) -> type:
    if cls not in _OWN_FORWARD:
        _OWN_FORWARD[cls] = type(f"Noisy{cls.__name__}", (NoisyOwnForward, cls),
                                 {"_own_forward": staticmethod(cls.forward), "__module__": __name__})
    return _OWN_FORWARD[cls]


NOISY_BATCH_NORMS = {nn.BatchNorm1d: NoisyBatchNorm1d, nn.BatchNorm2d: NoisyBatchNorm2d}
PLAIN_LAYER_NORMS = {("torch.nn.modules.normalization", "LayerNorm"), ("torchvision.models.convnext", "LayerNorm2d")}
NOISY_CONVS = {base: type(f"Noisy{base.__name__}", (NoisyConv, base), {})
               for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
NoisyLayer = _Noisy


def _noisy(module: nn.Module) -> _Noisy:
    """The noisy twin of one layer: a new BatchNorm module for ``nn.BatchNorm1d/2d``, otherwise the
    layer itself with its class changed."""
    kind = layer_kind(module)
    if type(module) in NOISY_BATCH_NORMS:
        cls = NOISY_BATCH_NORMS[type(module)]
        layer = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                    device=module.weight.device, dtype=module.weight.dtype)
        layer.load_state_dict(module.state_dict(), strict=False)
        layer.train(module.training)
        return layer
    if (type(module).__module__, type(module).__name__) in PLAIN_LAYER_NORMS:
        axis = layer_norm_axis(module)
        module.__class__ = NoisyLayerNorm
        module.channel_dim = axis
    elif kind != "conv_linear":
        module.__class__ = _own_forward_class(type(module))
    elif isinstance(module, nn.Linear):
        module.__class__ = NoisyLinear
    else:
        module.__class__ = next(c for base, c in NOISY_CONVS.items() if isinstance(module, base))
    module._init_noisy()
    return module


def to_noisy(model: nn.Module, mask_layers: Iterable[str] | str = DEFAULT_KINDS) -> dict[str, NoisyLayer]:
    """Replace, in place, every layer of ``model`` that ANP masks (``mask_layers``, see
    :mod:`fastpurify.neurons`) by its noisy twin holding the same weights, buffers and mode;
    return the noisy layers by name, in model order."""
    noisy = {}
    for name, module in neuron_layers(model, mask_layers).items():
        layer = _noisy(module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        noisy[name] = layer
    return noisy


def set_perturbed(layers: dict[str, NoisyLayer], perturbed: bool) -> None:
    """Switch the noise on or off in every layer (the script's include/exclude_noise)."""
    for layer in layers.values():
        layer.perturbed = perturbed
