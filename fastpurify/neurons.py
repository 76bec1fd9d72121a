"""Which layers of a model hold ANP neurons: one rule for the fast engine, the reference and pruning.

A neuron is one output feature of a layer with a scale to mask, and its mask multiplies that
scale (DESIGN.md §1). Three kinds of layer, chosen with ``mask_layers``:

- ``"batchnorm"``: ``nn.BatchNorm1d/2d`` with affine parameters; one neuron per channel;
- ``"layernorm"``: ``nn.LayerNorm`` over one feature axis (the last: ViT, Swin) and the
  ``LayerNorm2d`` of ConvNeXt-style models (the channel axis of NCHW); one neuron per feature;
- ``"conv_linear"``: the paper's Eq. 3 for networks without normalisation:
  ``nn.Conv1d/2d/3d`` and ``nn.Linear``, one neuron per output channel, the mask on the weight
  (``W_k * (m_k + delta_k)``, ``b_k * (1 + xi_k)``). Two kinds of such layer are left out: the
  last one in model order (the classifier, whose outputs are the logits) and the projections
  inside ``nn.MultiheadAttention`` (it reads their weights directly, never calls them).

The default masks both norm kinds. Layers come in ``model.named_modules()`` order; every
layer's neurons are its weight's first axis, so a pruned neuron is a zero row of ``weight``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .validation import InputError

KINDS = ("batchnorm", "layernorm", "conv_linear")
DEFAULT_KINDS = ("batchnorm", "layernorm")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


def layer_norm_axis(module: nn.LayerNorm) -> int:
    """The feature axis a LayerNorm normalises: -1 (``nn.LayerNorm((C,))``) or 1 (``LayerNorm2d`` on NCHW)."""
    return 1 if type(module).__name__ == "LayerNorm2d" else -1


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, CONV_LINEAR):
        return "conv_linear"
    return None


def _check_layer(name: str, module: nn.Module, kind: str) -> None:
    cls = type(module).__name__
    if not name:
        raise InputError(f"the model itself is a {cls}; wrap it in a network")
    if kind == "batchnorm" and not isinstance(module, BATCH_NORMS):
        raise InputError(f"layer {name!r} is a {cls}; ANP masks nn.BatchNorm1d and nn.BatchNorm2d")
    if kind == "layernorm":
        if type(module) is not nn.LayerNorm and cls != "LayerNorm2d":
            raise InputError(f"layer {name!r} is a {cls}, a LayerNorm subclass with its own forward; fastpurify "
                             "masks nn.LayerNorm and LayerNorm2d (NCHW, as torchvision's ConvNeXt)")
        if len(module.normalized_shape) != 1:
            raise InputError(f"layer {name!r} normalises over {tuple(module.normalized_shape)}; fastpurify masks "
                             "LayerNorms over one feature axis")
    if kind == "conv_linear" and type(module).forward not in {c.forward for c in CONV_LINEAR}:
        raise InputError(f"layer {name!r} is a {cls} with its own forward; the conv_linear option masks plain "
                         "nn.Conv1d/2d/3d and nn.Linear")
    if getattr(module, "weight", None) is None:
        raise InputError(f"layer {name!r} ({cls}) has no scale (affine=False / elementwise_affine=False): ANP masks "
                         "and prunes the scale, so every masked layer needs one; leave its kind out of mask_layers")


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
                         f"BatchNorm and LayerNorm scales by default (mask_layers={DEFAULT_KINDS}); for a network "
                         "without normalisation pass mask_layers=('conv_linear',) (CLI: --mask-layers conv_linear), "
                         f"the paper's Eq. 3 on Conv/Linear weights. Kinds present in this model: "
                         f"{', '.join(present) if present else 'none'}")
    for name, module in found.items():
        _check_layer(name, module, _kind(module))
    return found


def layer_kind(module: nn.Module) -> str | None:
    """``"batchnorm"``, ``"layernorm"``, ``"conv_linear"`` or None."""
    return _kind(module)


def num_neurons(module: nn.Module) -> int:
    """The neurons of a masked layer: its weight's first axis."""
    return int(module.weight.shape[0])
