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
- ``PerturbedGroupNorm``: the same per channel of a GroupNorm's affine (statistics per sample
  and group of channels, as ``nn.GroupNorm``);
- ``PerturbedBatchNormAct2d``, ``PerturbedGroupNormAct``, ``PerturbedLayerNormAct``: timm's
  norm-plus-activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``GroupNorm1Act``,
  ``LayerNormAct``, ``LayerNormAct2d``): the fused norm, then the layer's own ``drop`` and ``act``;
- ``PerturbedConv1d/2d/3d`` and ``PerturbedLinear`` (the paper's Eq. 3): output channel k is
  computed with weight ``W_k * (m_k + delta_k)`` and bias ``b_k * (1 + xi_k)``.

Two paths (``layer.path``). The **fused** classes above serve only the exact types whose forward
they reproduce: ``nn.BatchNorm1d/2d``, ``nn.LayerNorm``, ``nn.GroupNorm``, torchvision's and
timm's ``LayerNorm2d``, timm's ``LayerNorm``, ``GroupNorm``, ``GroupNorm1`` and the norm-act layers
(timm's only where its ``_fast_norm`` is off). Every other norm layer ANP masks (a subclass with
its own forward, ``BatchNorm3d``, ``SyncBatchNorm``, ``LayerNormFp32``, RMS norms, ...) takes the
**generic** path: its own forward runs unchanged, once per batch group, with ``weight * (m +
delta_g)`` and ``bias * (1 + xi_g)`` in place of its parameters (:mod:`fastpurify.substitution`),
so it is exact by construction. Conv/Linear layers take ``"conv_linear"``.

Which layers are converted is :func:`fastpurify.neurons.neuron_layers`' rule (``mask_layers``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as FP
from .neurons import DEFAULT_KINDS, layer_kind, layer_norm_axis, neuron_layers, num_neurons
from .substitution import call_with_affine
from .validation import InputError


class _Neurons:
    """Mixed into a layer: the mask parameter and the perturbation an engine sets."""

    path = "fused"

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
    fused_relu = False  # set by fastpurify.fusion where the ReLU after it was folded in: ReLU(BatchNorm)
    fused_residual = False  # ... and where the residual add before that ReLU was too: ReLU(BatchNorm + r)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._init_neurons(num_features, torch.empty(0, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """BatchNorm(x), ReLU'd where ``fused_relu``; with ``residual`` (a folded ResNet block's
        shortcut, ``fused_residual``): ReLU(BatchNorm(x) + residual), in one pass where the
        residual matches x's shape, dtype and device, else as the add and ReLU would compute it."""
        self._check_input_dim(x)
        if residual is not None and not self.fused_relu:
            raise InputError("a residual is added before the folded ReLU only: this layer has none (fused_relu)")
        relu, one_pass = self.fused_relu, residual
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                     or residual.device != x.device):
            relu, one_pass = False, None  # added and ReLU'd below, as the unfused graph would
        # Momentum and the running-statistics rule exactly as nn.BatchNorm's forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        noise, noise_bias = self._perturbation()
        y = FP.perturbed_batch_norm(
            x, self.weight, self.bias, self.neuron_mask, noise, noise_bias,
            self.running_mean if track else None, self.running_var if track else None,
            training=use_batch_stats, momentum=factor, eps=self.eps, groups=self.batch_groups, relu=relu,
            residual=one_pass)
        if residual is not None and one_pass is None:  # type promotion and broadcasting as the unfused graph's
            return F.relu(y + residual)
        return y


class PerturbedBatchNorm1d(_PerturbedBatchNorm):
    _check_input_dim = nn.BatchNorm1d._check_input_dim


class PerturbedBatchNorm2d(_PerturbedBatchNorm):
    _check_input_dim = nn.BatchNorm2d._check_input_dim


class _ThenDropAndAct:
    """timm's norm-act layers: the (fused) norm, then the layer's own ``drop`` and ``act``, as their forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class PerturbedBatchNormAct2d(_ThenDropAndAct, PerturbedBatchNorm2d):
    pass


class PerturbedLayerNorm(_Neurons, nn.LayerNorm):
    """``nn.LayerNorm((C,))`` (``channel_dim=-1``) or ConvNeXt's LayerNorm2d (``channel_dim=1``)."""

    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise, noise_bias = self._perturbation()
        return FP.perturbed_layer_norm(x, self.weight, self.bias, self.neuron_mask, noise, noise_bias, eps=self.eps,
                                       groups=self.batch_groups, channel_dim=self.channel_dim)


class PerturbedLayerNormAct(_ThenDropAndAct, PerturbedLayerNorm):
    pass


class PerturbedGroupNorm(_Neurons, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise, noise_bias = self._perturbation()
        return FP.perturbed_group_norm(x, self.weight, self.bias, self.neuron_mask, noise, noise_bias,
                                       num_groups=self.num_groups, eps=self.eps, groups=self.batch_groups)


class PerturbedGroupNormAct(_ThenDropAndAct, PerturbedGroupNorm):
    pass


class _GenericNeurons(_Neurons):
    """Any other norm layer: its own forward (``_own_forward``) with the perturbed scale and shift
    in place of its weight and bias, once per batch group (each group its own statistics, as in
    the fused ops)."""

    path = "generic"
    _own_forward = None  # the original class's forward, set per generated class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise, noise_bias = self._perturbation()
        groups, c = self.batch_groups, self.num_neurons
        rows = lambda t: None if t is None else t.view(groups, c)  # noqa: E731  ((C,) for one group)
        scale, shift = FP.group_affine(self.weight, getattr(self, "bias", None), self.neuron_mask, rows(noise),
                                       rows(noise_bias), groups, c)
        parts = [x] if groups == 1 else x.chunk(groups)
        outs = [call_with_affine(self, self._own_forward, part, scale[g], None if shift is None else shift[g])
                for g, part in enumerate(parts)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


_GENERIC: dict[type, type] = {}


def _generic_class(cls: type) -> type:
    """``Perturbed<Name>``: ``cls`` with the generic path's forward (one class per original class)."""
    if cls not in _GENERIC:
        _GENERIC[cls] = type(f"Perturbed{cls.__name__}", (_GenericNeurons, cls),
                             {"_own_forward": staticmethod(cls.forward), "__module__": __name__,
                              "__qualname__": f"Perturbed{cls.__name__}"})
    return _GENERIC[cls]


class _PerturbedOutputs(_Neurons):
    """Eq. 3 on a Conv/Linear layer: the bias-free output, each channel scaled and shifted."""

    channel_dim = 1
    path = "conv_linear"

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


# The exact types whose forward a fused class reproduces: (module, class name) -> fused class (a
# LayerNorm's feature axis is neurons.layer_norm_axis'). timm's and torchvision's classes are
# matched by name, so fastpurify never imports them; a subclass of any of these (its own forward
# or not) takes the generic path.
_FUSED = {
    ("torch.nn.modules.batchnorm", "BatchNorm1d"): PerturbedBatchNorm1d,
    ("torch.nn.modules.batchnorm", "BatchNorm2d"): PerturbedBatchNorm2d,
    ("torch.nn.modules.normalization", "LayerNorm"): PerturbedLayerNorm,
    ("torch.nn.modules.normalization", "GroupNorm"): PerturbedGroupNorm,
    ("torchvision.models.convnext", "LayerNorm2d"): PerturbedLayerNorm,
    ("timm.layers.norm", "LayerNorm"): PerturbedLayerNorm,
    ("timm.layers.norm", "LayerNorm2d"): PerturbedLayerNorm,
    ("timm.layers.norm", "GroupNorm"): PerturbedGroupNorm,
    ("timm.layers.norm", "GroupNorm1"): PerturbedGroupNorm,
    ("timm.layers.norm_act", "BatchNormAct2d"): PerturbedBatchNormAct2d,
    ("timm.layers.norm_act", "GroupNormAct"): PerturbedGroupNormAct,
    ("timm.layers.norm_act", "GroupNorm1Act"): PerturbedGroupNormAct,
    ("timm.layers.norm_act", "LayerNormAct"): PerturbedLayerNormAct,
    ("timm.layers.norm_act", "LayerNormAct2d"): PerturbedLayerNormAct,
}


def _fused_twin(module: nn.Module) -> type | None:
    """The fused class for a layer of an exact known type, else None.
    timm's layers qualify only with ``_fast_norm`` off (on, their forward is another op)."""
    cls = type(module)
    twin = _FUSED.get((cls.__module__, cls.__name__))
    if twin is None or getattr(module, "_fast_norm", False):
        return None
    return twin


def layer_path(module: nn.Module) -> str:
    """How :func:`convert` perturbs a layer that ANP masks: ``"fused"``, ``"generic"`` or ``"conv_linear"``."""
    if layer_kind(module) == "conv_linear":
        return "conv_linear"
    return "fused" if _fused_twin(module) is not None else "generic"


def _perturbed(module: nn.Module) -> nn.Module:
    """The perturbed twin of a layer of the (already copied) model: the layer itself with its
    class changed (parameters, buffers, submodules, hooks and flags stay)."""
    twin = _fused_twin(module)
    if layer_kind(module) == "conv_linear":
        module.__class__ = next(new for base, new in _OUTPUTS if isinstance(module, base))
    elif twin is not None:
        if issubclass(twin, PerturbedLayerNorm):
            module.channel_dim = layer_norm_axis(module)  # read from the original class's name
        module.__class__ = twin
    else:
        module.__class__ = _generic_class(type(module))
    module._init_neurons(num_neurons(module), module.weight)
    return module


def convert(model: nn.Module, mask_layers: Iterable[str] | str = DEFAULT_KINDS) -> nn.Module:
    """A copy of ``model`` with every layer that :func:`fastpurify.neurons.neuron_layers` picks
    (by default every BatchNorm, LayerNorm and GroupNorm) turned into its perturbed twin, weights,
    buffers, submodules and train/eval flags kept: with mask 1 and no noise it computes what
    ``model`` computes. The given model is not modified."""
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


def layer_paths(model: nn.Module) -> dict[str, int]:
    """How many perturbed layers of a converted model take each path (``fused``, ``generic``, ``conv_linear``)."""
    return dict(Counter(layer.path for layer in perturbed_layers(model).values()))
