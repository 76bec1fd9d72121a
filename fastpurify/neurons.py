"""Which layers of a model hold ANP neurons: one rule for the fast engine, the reference and pruning.

A neuron is one output feature of a layer with a scale to mask, and its mask multiplies that
scale (DESIGN.md §1). Four kinds of layer, chosen with ``mask_layers``:

- ``"batchnorm"``: every ``nn.BatchNorm*`` and subclass with affine parameters (timm's
  ``BatchNormAct2d`` and ``SyncBatchNormAct`` included) and timm's batch-statistics EvoNorms
  (``EvoNorm2dB*``); one neuron per channel;
- ``"layernorm"``: every ``nn.LayerNorm`` and subclass over one feature axis (ViT, Swin; ConvNeXt's
  ``LayerNorm2d`` over the channel axis of NCHW; timm's ``LayerNorm``, ``LayerNorm2d``,
  ``LayerNormFp32``, ``LayerNormAct`` ...), and the RMS-style norms whose scale is a per-feature
  weight (``nn.RMSNorm``; timm's ``RmsNorm``, ``RmsNorm2d``, ``SimpleNorm`` and their Fp32 forms);
  one neuron per feature;
- ``"groupnorm"``: every ``nn.GroupNorm`` and subclass (timm's ``GroupNorm``, ``GroupNorm1``,
  ``GroupNormAct``, ``GroupNorm1Act``) and timm's group-statistics EvoNorms (``EvoNorm2dS*``); one
  neuron per channel of its affine;
- ``"conv_linear"``: the paper's Eq. 3 for networks without normalisation:
  ``nn.Conv1d/2d/3d`` and ``nn.Linear``, one neuron per output channel, the mask on the weight
  (``W_k * (m_k + delta_k)``, ``b_k * (1 + xi_k)``). Two kinds of such layer are left out: the
  last one in model order (the classifier, whose outputs are the logits) and the projections
  inside ``nn.MultiheadAttention`` (it reads their weights directly, never calls them).

The default masks the three norm kinds. Layers come in ``model.named_modules()`` order; every
layer's neurons are its weight's first (only) axis, so a pruned neuron is a zero in ``weight``.
How a layer is perturbed (a fused op, or its own forward with a perturbed weight) is
:mod:`fastpurify.layers`' choice; which layers count is this module's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .validation import InputError

KINDS = ("batchnorm", "layernorm", "groupnorm", "conv_linear")
DEFAULT_KINDS = ("batchnorm", "layernorm", "groupnorm")
CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Norms that are no nn.LayerNorm but scale each feature of a position by a weight: the ANP rule
# applies to that weight (they have no shift). timm's classes are matched by module and name, so
# fastpurify never imports timm.
RMS_NORMS = frozenset({"RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d",
                       "SimpleNormFp32", "SimpleNorm2dFp32"})
KIND_OPTIONS = ("mask_layers options: 'batchnorm', 'layernorm', 'groupnorm' (the default masks all three) and "
                "'conv_linear' (CLI: --mask-layers batchnorm,layernorm,groupnorm,conv_linear)")


def check_kinds(mask_layers: Iterable[str] | str) -> tuple[str, ...]:
    """The chosen layer kinds as a tuple in :data:`KINDS` order; a comma-separated string is accepted."""
    if isinstance(mask_layers, str):
        mask_layers = [k.strip() for k in mask_layers.split(",") if k.strip()]
    try:
        chosen = set(mask_layers)
    except TypeError:
        raise InputError(f"mask_layers must be a collection of {KINDS}, got {mask_layers!r}") from None
    unknown = sorted(str(k) for k in chosen - set(KINDS))
    if unknown or not chosen:
        raise InputError(f"mask_layers must name one or more of {', '.join(KINDS)}; got "
                         f"{', '.join(unknown) if unknown else 'none'}")
    return tuple(k for k in KINDS if k in chosen)


def layer_norm_axis(module: nn.Module) -> int:
    """The feature axis a LayerNorm normalises: -1 (``nn.LayerNorm((C,))``) or 1 (``LayerNorm2d``,
    ``LayerNormAct2d`` on NCHW)."""
    return 1 if type(module).__name__ in ("LayerNorm2d", "LayerNormAct2d") else -1


def _timm_names(module: nn.Module) -> set[str]:
    """The names of the timm classes in a layer's ancestry (timm is matched by name, never imported)."""
    return {c.__name__ for c in type(module).__mro__ if c.__module__.startswith("timm.")}


def _kind(module: nn.Module) -> str | None:
    timm = _timm_names(module)
    if isinstance(module, _BatchNorm) or any(n.startswith("EvoNorm2dB") for n in timm):
        return "batchnorm"
    rms = getattr(nn, "RMSNorm", None)
    if isinstance(module, nn.LayerNorm) or (rms is not None and isinstance(module, rms)) or timm & RMS_NORMS:
        return "layernorm"
    if isinstance(module, nn.GroupNorm) or any(n.startswith("EvoNorm2dS") for n in timm):
        return "groupnorm"
    if isinstance(module, CONV_LINEAR):
        return "conv_linear"
    return None


def _check_layer(name: str, module: nn.Module, kind: str) -> None:
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if not name:
        raise InputError(f"the model itself is a {type(module).__name__}; wrap it in a network")
    if kind == "conv_linear":
        if type(module).forward not in {c.forward for c in CONV_LINEAR}:
            raise InputError(f"layer {name!r} is a {cls} with its own forward; the conv_linear option masks plain "
                             "nn.Conv1d/2d/3d and nn.Linear")
        return
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is None:
        raise InputError(f"layer {name!r} ({cls}) has no scale (affine=False / elementwise_affine=False): ANP masks "
                         f"and prunes the scale, so every masked layer needs one; leave {kind!r} out of mask_layers "
                         f"({KIND_OPTIONS})")
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        raise InputError(f"layer {name!r} ({cls}) normalises over {tuple(module.normalized_shape)}; fastpurify masks "
                         f"LayerNorms over one feature axis; leave 'layernorm' out of mask_layers ({KIND_OPTIONS})")
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        shape = tuple(weight.shape) if hasattr(weight, "shape") else type(weight).__name__
        raise InputError(f"layer {name!r} ({cls}) cannot be perturbed: ANP needs its scale as a parameter of one "
                         f"value per feature, but its weight is a {'buffer' if not isinstance(weight, nn.Parameter) else 'parameter'} "
                         f"of shape {shape}; leave {kind!r} out of mask_layers ({KIND_OPTIONS})")
    if bias is not None and (not isinstance(bias, nn.Parameter) or tuple(bias.shape) != tuple(weight.shape)):
        raise InputError(f"layer {name!r} ({cls}) cannot be perturbed: its bias is not a parameter shaped like its "
                         f"weight {tuple(weight.shape)}; leave {kind!r} out of mask_layers ({KIND_OPTIONS})")


def _attention_parts(model: nn.Module) -> set[int]:
    """ids of the modules inside every nn.MultiheadAttention (it uses their weights, not their forward)."""
    return {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention)
            for m in mha.modules() if m is not mha}


def neuron_layers(model: nn.Module, mask_layers: Iterable[str] | str = DEFAULT_KINDS) -> dict[str, nn.Module]:
    """The layers whose neurons ANP masks, by module name in model order, each checked.

    Raises :class:`InputError` naming the options when there is none."""
    kinds = check_kinds(mask_layers)
    found: dict[str, nn.Module] = {}
    skip = _attention_parts(model)
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind in kinds and id(module) not in skip:
            found[name] = module
    if "conv_linear" in kinds:
        last = [n for n, m in found.items() if _kind(m) == "conv_linear"][-1:]
        for n in last:  # the classifier: its neurons are the logits
            del found[n]
    if not found:
        present = sorted({k for m in model.modules() if (k := _kind(m)) is not None})
        raise InputError(f"{type(model).__name__} has no layer to mask among {', '.join(kinds)}: ANP masks "
                         f"BatchNorm, LayerNorm and GroupNorm scales by default (mask_layers={DEFAULT_KINDS}); for a network "
                         "without normalisation pass mask_layers=('conv_linear',) (CLI: --mask-layers conv_linear), "
                         f"the paper's Eq. 3 on Conv/Linear weights. Kinds present in this model: "
                         f"{', '.join(present) if present else 'none'}")
    for name, module in found.items():
        _check_layer(name, module, _kind(module))
    return found


def layer_kind(module: nn.Module) -> str | None:
    """``"batchnorm"``, ``"layernorm"``, ``"groupnorm"``, ``"conv_linear"`` or None."""
    return _kind(module)


def num_neurons(module: nn.Module) -> int:
    """The neurons of a masked layer: its weight's first axis."""
    return int(module.weight.shape[0])
