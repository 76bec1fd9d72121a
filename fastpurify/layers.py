"""Masked-and-perturbed BatchNorm modules and the conversion that swaps them into any model.

``PerturbedBatchNorm1d/2d`` are drop-ins for ``nn.BatchNorm1d/2d``: the same parameters,
buffers and state_dict keys, plus ``neuron_mask`` (a parameter, initialised to 1). The
perturbation is not part of the state: an engine sets ``noise`` / ``noise_bias`` ((groups, C)
tensors, typically views into one flat arena) and ``groups``, and turns ``perturbed`` on.
With mask 1 and no perturbation the output equals the original BatchNorm's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import functional as FP
from .validation import InputError

SUPPORTED = (nn.BatchNorm1d, nn.BatchNorm2d)


class _PerturbedBatchNorm(nn.modules.batchnorm._BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.neuron_mask = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.noise: torch.Tensor | None = None
        self.noise_bias: torch.Tensor | None = None
        self.groups = 1
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # Momentum and the running-statistics rule exactly as nn.BatchNorm's forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return FP.perturbed_batch_norm(
            x, self.weight, self.bias, self.neuron_mask,
            self.noise if self.perturbed else None, self.noise_bias if self.perturbed else None,
            self.running_mean if track else None, self.running_var if track else None,
            training=use_batch_stats, momentum=factor, eps=self.eps, groups=self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}, perturbed={self.perturbed}"


class PerturbedBatchNorm1d(_PerturbedBatchNorm):
    _check_input_dim = nn.BatchNorm1d._check_input_dim


class PerturbedBatchNorm2d(_PerturbedBatchNorm):
    _check_input_dim = nn.BatchNorm2d._check_input_dim


def _swap(bn: nn.modules.batchnorm._BatchNorm) -> _PerturbedBatchNorm:
    cls = PerturbedBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else PerturbedBatchNorm1d
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    new.load_state_dict(bn.state_dict(), strict=False)
    if bn.affine:
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
    new.train(bn.training)
    return new


def convert(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm1d/2d (and subclass) replaced by its perturbed
    twin, weights, buffers and train/eval flags kept. The given model is not modified."""
    if not any(isinstance(m, SUPPORTED) for m in model.modules()):
        raise InputError(f"{type(model).__name__} has no layer to mask: fastpurify masks "
                         f"{', '.join(c.__name__ for c in SUPPORTED)} layers, and found none")
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SUPPORTED) and not isinstance(child, _PerturbedBatchNorm):
                setattr(module, child_name, _swap(child))
    return model


def perturbed_layers(model: nn.Module) -> dict[str, _PerturbedBatchNorm]:
    """The perturbed BatchNorm layers of a converted model, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _PerturbedBatchNorm)}
