"""The official ANP noisy BatchNorm, and the swap that puts it into any model.

Each channel holds ``neuron_mask`` m (init 1), ``neuron_noise`` delta and
``neuron_noise_bias`` xi (init 0). Perturbed, the layer computes
``batch_norm(x, ..., gamma * (m + delta), beta * (1 + xi))``; unperturbed,
``batch_norm(x, ..., gamma * m, beta)``. Everything else (batch or running statistics, their
update in training mode) is exactly ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..validation import InputError

SUPPORTED = "nn.BatchNorm1d and nn.BatchNorm2d with affine parameters"


class _Noisy:
    """Mixed into a BatchNorm class: the three per-channel ANP parameters and the forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.neuron_mask = nn.Parameter(torch.ones_like(self.weight))
        self.neuron_noise = nn.Parameter(torch.zeros_like(self.weight))
        self.neuron_noise_bias = nn.Parameter(torch.zeros_like(self.weight))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.perturbed:
            weight = self.weight * (self.neuron_mask + self.neuron_noise)
            bias = self.bias * (1.0 + self.neuron_noise_bias)
        else:
            weight, bias = self.weight * self.neuron_mask, self.bias
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if tracked else None, self.running_var if tracked else None,
                            weight, bias, use_batch_stats, factor, self.eps)


class NoisyBatchNorm1d(_Noisy, nn.BatchNorm1d):
    pass


class NoisyBatchNorm2d(_Noisy, nn.BatchNorm2d):
    pass


NOISY = {nn.BatchNorm1d: NoisyBatchNorm1d, nn.BatchNorm2d: NoisyBatchNorm2d}
NoisyBatchNorm = NoisyBatchNorm1d | NoisyBatchNorm2d


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers by name, checked to be ones ANP can mask."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not layers:
        raise InputError(f"{type(model).__name__} has no BatchNorm layer: ANP masks the channels of {SUPPORTED} "
                         "(e.g. ResNets, VGG-BN, MobileNets); models normalised otherwise are not supported")
    for name, m in layers.items():
        if not name:
            raise InputError("the model itself is a BatchNorm layer; wrap it in a network")
        if not isinstance(m, tuple(NOISY)):
            raise InputError(f"layer {name!r} is a {type(m).__name__}; ANP supports {SUPPORTED}")
        if m.weight is None or m.bias is None:
            raise InputError(f"layer {name!r} has no affine parameters (affine=False); ANP supports {SUPPORTED}")
    return layers


def to_noisy(model: nn.Module) -> dict[str, NoisyBatchNorm]:
    """Replace, in place, every BatchNorm of ``model`` by its noisy twin holding the same
    weights, buffers and mode; return the noisy layers by name, in model order."""
    noisy = {}
    for name, bn in batchnorm_layers(model).items():
        cls = next(c for base, c in NOISY.items() if isinstance(bn, base))
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device=bn.weight.device, dtype=bn.weight.dtype)
        layer.load_state_dict(bn.state_dict(), strict=False)
        layer.train(bn.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        noisy[name] = layer
    return noisy


def set_perturbed(layers: dict[str, NoisyBatchNorm], perturbed: bool) -> None:
    """Switch the noise on or off in every layer (the script's include/exclude_noise)."""
    for layer in layers.values():
        layer.perturbed = perturbed
