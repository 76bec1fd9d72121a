"""Masked-and-perturbed layers and the conversion that swaps them into any model.

Every perturbed layer holds ``neuron_mask`` (a parameter, initialised to 1, one entry per
neuron: its weight's first axis) and is otherwise the layer it replaces: the same parameters,
buffers and state_dict keys. The perturbation is not part of the state: an engine sets
``noise`` / ``noise_bias`` ((groups, C) tensors, typically views into one flat arena) and
``batch_groups`` (the batch's equal groups, each with its own noise row), and turns ``perturbed`` on. With mask 1 and no perturbation each computes what the
original layer computes.

- ``PerturbedBatchNorm1d/2d``: scale ``gamma * (m + delta)``, shift ``beta * (1 + xi)``,
  batch or running statistics as ``nn.BatchNorm``;
- ``PerturbedLayerNorm``: the same per feature, statistics per position (``nn.LayerNorm`` over
  the last axis, or ConvNeXt's ``LayerNorm2d`` over the channels of NCHW);
- ``PerturbedConv1d/2d/3d`` and ``PerturbedLinear`` (the paper's Eq. 3): output channel k is
  computed with weight ``W_k * (m_k + delta_k)`` and bias ``b_k * (1 + xi_k)``.

Which layers are converted is :func:`fastpurify.neurons.neuron_layers`' rule (``mask_layers``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as FP
from .neurons import DEFAULT_KINDS, layer_kind, layer_norm_axis, neuron_layers, num_neurons
from .validation import InputError


class _Neurons:
    """Mixed into a layer: the mask parameter and the perturbation an engine sets."""

    def _init_neurons(self, count: int, like: torch.Tensor | None) -> None:
        kw = {} if like is None else dict(device=like.device, dtype=like.dtype)
        self.neuron_mask = nn.Parameter(torch.ones(count, **kw))
        self.noise: torch.Tensor | None = None
        self.noise_bias: torch.Tensor | None = None
        self.batch_groups = 1
        self.perturbed = False

    @property
    def num_neurons(self) -> int:
        return int(self.neuron_mask.numel())

    def _perturbation(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.noise, self.noise_bias) if self.perturbed else (None, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_groups={self.batch_groups}, perturbed={self.perturbed}"


class _PerturbedBatchNorm(_Neurons, nn.modules.batchnorm._BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._init_neurons(num_features, torch.empty(0, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # Momentum and the running-statistics rule exactly as nn.BatchNorm's forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        noise, noise_bias = self._perturbation()
        return FP.perturbed_batch_norm(
            x, self.weight, self.bias, self.neuron_mask, noise, noise_bias,
            self.running_mean if track else None, self.running_var if track else None,
            training=use_batch_stats, momentum=factor, eps=self.eps, groups=self.batch_groups)


class PerturbedBatchNorm1d(_PerturbedBatchNorm):
    _check_input_dim = nn.BatchNorm1d._check_input_dim


class PerturbedBatchNorm2d(_PerturbedBatchNorm):
    _check_input_dim = nn.BatchNorm2d._check_input_dim


class PerturbedLayerNorm(_Neurons, nn.LayerNorm):
    """``nn.LayerNorm((C,))`` (``channel_dim=-1``) or ConvNeXt's LayerNorm2d (``channel_dim=1``)."""

    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise, noise_bias = self._perturbation()
        return FP.perturbed_layer_norm(x, self.weight, self.bias, self.neuron_mask, noise, noise_bias, eps=self.eps,
                                       groups=self.batch_groups, channel_dim=self.channel_dim)


class _PerturbedOutputs(_Neurons):
    """Eq. 3 on a Conv/Linear layer: the bias-free output, each channel scaled and shifted."""

    channel_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise, noise_bias = self._perturbation()
        return FP.perturbed_channel_affine(self._bias_free(x), self.bias, self.neuron_mask, noise, noise_bias,
                                           groups=self.batch_groups, channel_dim=self.channel_dim)

    def _bias_free(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, None)


class PerturbedConv1d(_PerturbedOutputs, nn.Conv1d):
    pass


class PerturbedConv2d(_PerturbedOutputs, nn.Conv2d):
    pass


class PerturbedConv3d(_PerturbedOutputs, nn.Conv3d):
    pass


class PerturbedLinear(_PerturbedOutputs, nn.Linear):
    channel_dim = -1

    def _bias_free(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


_OUTPUTS = ((nn.Conv1d, PerturbedConv1d), (nn.Conv2d, PerturbedConv2d), (nn.Conv3d, PerturbedConv3d),
            (nn.Linear, PerturbedLinear))


def _swap_batch_norm(bn: nn.modules.batchnorm._BatchNorm) -> _PerturbedBatchNorm:
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


def _perturbed(module: nn.Module) -> nn.Module:
    """The perturbed twin of a layer of the (already copied) model. LayerNorm and Conv/Linear
    layers become it in place (their class changes; parameters, hooks and flags stay)."""
    kind = layer_kind(module)
    if kind == "batchnorm":
        return _swap_batch_norm(module)
    if kind == "layernorm":
        axis = layer_norm_axis(module)
        module.__class__ = PerturbedLayerNorm
        module.channel_dim = axis
    else:
        module.__class__ = next(new for base, new in _OUTPUTS if isinstance(module, base))
    module._init_neurons(num_neurons(module), module.weight)
    return module


def convert(model: nn.Module, mask_layers: Iterable[str] | str = DEFAULT_KINDS) -> nn.Module:
    """A copy of ``model`` with every layer that :func:`fastpurify.neurons.neuron_layers` picks
    (by default every BatchNorm1d/2d and LayerNorm) replaced by its perturbed twin, weights,
    buffers and train/eval flags kept. The given model is not modified."""
    if perturbed_layers(model):
        raise InputError("the model is already converted (it holds perturbed layers); convert the original model")
    names = list(neuron_layers(model, mask_layers))  # checks, with a clear error, before the copy
    model = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, _perturbed(getattr(holder, child)))
    return model


def perturbed_layers(model: nn.Module) -> dict[str, _Neurons]:
    """The perturbed layers of a converted model, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Neurons)}
