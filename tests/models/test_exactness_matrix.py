"""The conversion's guarantee over a matrix of real models: with mask 1 and no noise, the model that
:func:`fastpurify.layers.convert` returns computes what the original computes, in eval and in
train mode (running statistics included), or ``convert`` refuses with an InputError that names
the layer it cannot convert and that layer's type. The models are every torchvision classifier and
a spread of timm architectures (tests/models/zoo.py).

Each model is built once, freshly initialised, and every norm layer's scale, shift and running
statistics are randomised first (with the identity-like init, scale 1 and shift 0, a conversion
that drops a scale, a shift or running statistics would go unseen), as is every parameter that
starts constant (layer scales of 1e-6, zero-initialised residual gains and heads), which would
otherwise hide the layers behind them. The comparison runs in float64, on fastpurify's PyTorch
path (as a user's CPU runs it), a batch of 2 at the spec's input size, the same torch seed before
each forward (dropout and drop-path draw alike on both sides). A model without any norm layer is
refused for that, naming the model (there is no layer to name). About 60 s on 2 cores in all;
``pytest --durations=0`` gives each model's time.

Tolerance: ``max|converted - original| <= 1e-7 * max|original|`` for each output and each
floating state_dict entry after the training pass (integers, the batch counters, exactly). Both
sides run float64 operations that may differ only in the order of a few sums and products (the
converted norm layers compute ``gamma * m`` and their statistics their own way): rounding of ~1e-16
per layer. Over this matrix today the passing models differ by 0 (CNNs: bit-identical) to 3.7e-15
(ViT-H, Swin-B), train mode included; the smallest real failure (a dropped activation) differs by
9e-2. 1e-7 leaves eight orders of magnitude above rounding for an implementation that sums in
another order, and six below the smallest error a dropped activation, scale, shift or running
statistic makes (each is randomised to O(1)).
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
import torch.nn as nn

from fastpurify._torchvision import import_torchvision
from fastpurify.layers import convert, perturbed_layers
from fastpurify.validation import InputError

from .zoo import BATCH, TIMM_SPECS, TORCHVISION_NAMES, Spec, specs, torchvision_specs

TOLERANCE = 1e-7  # relative to the largest magnitude of the original output (module docstring)
# Norm-like layers that ANP leaves alone by design (docs/norm-layers.md), and why. Every other
# norm layer of a converted model must have been converted: none is silently left unmasked.
NOT_MASKED = {
    "GlobalResponseNorm": "ConvNeXt-V2's GRN is residual (x + gamma * x * N(x) + beta): its gamma silences no channel",
    "FrozenBatchNorm2d": "its scale is a buffer, not a parameter",
    "FrozenBatchNormAct2d": "its scale is a buffer, not a parameter",
}
_NORM_CLASS = re.compile(r"Norm(?!Free)")  # BatchNorm2d, BatchNormAct2d, LayerNorm2d, RmsNorm2d, EvoNorm2dS0, ...


def is_norm(module: nn.Module) -> bool:
    """A norm layer (torch's, timm's, or a model's own): a class in its ancestry has "Norm" in its
    name (not timm's NormFree blocks), and it holds its own parameters or running statistics
    (containers such as ConvNormAct or NormMlpClassifierHead hold none themselves)."""
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return bool(own) and any(_NORM_CLASS.search(c.__name__) for c in type(module).__mro__)


def _constant(p: torch.Tensor) -> bool:
    flat = p.detach().flatten()
    if not p.is_floating_point() or not flat.numel():
        return False
    return flat.numel() == 1 or (bool(flat[0] == flat[-1]) and bool((flat == flat[0]).all()))  # cheap first


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm scales in [0.5, 1.5), shifts ~ N(0, 0.2^2), running means ~ N(0, 0.2^2) and
    variances in [0.5, 1.5); every other parameter that starts constant gets random values too:
    a nonzero constant c (layer scale 1e-6 aside) is scaled by [0.5, 1.5), a constant near 0
    becomes N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t):
        return torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5

    def normal(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2

    with torch.no_grad():
        for module in model.modules():
            norm = is_norm(module)
            for name, p in module.named_parameters(recurse=False):
                if norm:
                    p.copy_(normal(p) if name in ("bias", "beta") or name.endswith("_bias") else uniform(p))
                elif _constant(p):
                    c = float(p.flatten()[0])
                    p.copy_(c * uniform(p) if abs(c) >= 0.1 else normal(p))
            for name, b in module.named_buffers(recurse=False):
                if name == "running_mean":
                    b.copy_(normal(b))
                elif name == "running_var":
                    b.copy_(uniform(b))
    return model


def outputs(out) -> list[torch.Tensor]:
    """The tensors of a forward's result (a tensor, or GoogLeNet's / DeiT's tuple of heads)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs(o)]
    raise TypeError(f"unexpected model output {type(out).__name__}")


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def check_refusal(model: nn.Module, message: str) -> None:
    """The InputError names the layer convert refused and its type (or, for a model with no norm
    layer at all, names the model and says there is nothing to mask)."""
    types = {name: type(m).__name__ for name, m in model.named_modules() if name}
    named = [q for q in re.findall(r"'([^']+)'", message) if q in types]
    if any(types[q] in message for q in named):
        return
    if not any(is_norm(m) for m in model.modules()) and type(model).__name__ in message and "no layer" in message:
        return
    pytest.fail(f"convert refused {type(model).__name__} without naming the layer and its type: {message}")


def differences(spec: Spec, model: nn.Module) -> tuple[dict[str, float], str | None]:
    """For ``model`` (built from ``spec``, randomised here): the relative difference of every
    output (eval, then train mode) and of every floating state_dict entry after the training
    pass, or convert's InputError message (no differences).
    A mismatch of the state_dict's keys or of an integer entry counts as difference inf."""
    randomise(model)
    try:
        converted = convert(model)
    except InputError as err:
        return {}, str(err)
    diffs: dict[str, float] = {}
    model, converted = model.double(), converted.double()
    x = torch.rand(BATCH, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        for mode in ("eval", "train"):
            model.train(mode == "train")
            converted.train(mode == "train")
            torch.manual_seed(2)  # the same dropout and drop-path draws on both sides
            expected = outputs(model(x))
            torch.manual_seed(2)
            got = outputs(converted(x))
            assert len(got) == len(expected), f"{mode}: {len(got)} outputs, the original gives {len(expected)}"
            for i, (g, e) in enumerate(zip(got, expected)):
                assert torch.isfinite(e).all() and e.abs().max() > 0, f"{mode}: degenerate output {i} of the original"
                diffs[f"{mode} output {i}"] = relative_difference(g, e)
    # The training pass moved the running statistics (and counters) of both sides identically.
    before, after = model.state_dict(), converted.state_dict()
    masks = {k for k in after if k.endswith("neuron_mask")}
    for key in sorted((set(after) - masks) ^ set(before)):
        diffs[f"state_dict key {key} only in the {'converted' if key in after else 'original'} model"] = float("inf")
    for key, e in before.items():
        if key in after and e.numel():
            g = after[key]
            same = torch.equal(g, e)
            diffs[key] = relative_difference(g, e) if e.is_floating_point() else 0.0 if same else float("inf")
    return diffs, None


def unmasked_norms(model: nn.Module) -> list[str]:
    """The norm layers of ``model`` that conversion left as they were, other than :data:`NOT_MASKED`'s."""
    converted = set(perturbed_layers(convert(model)))
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if is_norm(m) and name not in converted and type(m).__name__ not in NOT_MASKED]


def check_exact(spec: Spec) -> None:
    model = spec.construct()
    diffs, refusal = differences(spec, model)
    if refusal is not None:
        check_refusal(model, refusal)
        return
    left = unmasked_norms(model)
    assert not left, f"{spec.model}: norm layers left unmasked: {', '.join(left[:8])}"
    failures = [f"{what}: relative difference {d:.3g}" for what, d in diffs.items() if not d <= TOLERANCE]
    assert not failures, f"{spec.model} converted computes otherwise: " + "; ".join(failures[:8])


def test_every_torchvision_classifier_has_a_spec():
    tv = import_torchvision()
    listed = set(tv.models.list_models(module=tv.models))
    assert listed == set(TORCHVISION_NAMES), (
        f"torchvision classifiers without a spec in tests/models/zoo.py: {sorted(listed - set(TORCHVISION_NAMES))}; "
        f"specs for names torchvision does not list: {sorted(set(TORCHVISION_NAMES) - listed)}")
    assert len(TIMM_SPECS) >= 30 and len({s.model for s in TIMM_SPECS}) == len(TIMM_SPECS)


def layer_kinds(model: nn.Module) -> tuple[set[str], set[tuple]]:
    """Every module class of a model, and every norm layer's class and settings (not its width)."""
    settings = ("eps", "momentum", "affine", "track_running_stats", "elementwise_affine", "num_groups")
    classes = {type(m).__name__ for m in model.modules()}
    norms = {(type(m).__name__, *(getattr(m, a, None) for a in settings)) for m in model.modules() if is_norm(m)}
    return classes, norms


def test_reductions_keep_every_kind_of_layer():
    """Each reduced torchvision spec (zoo.py) holds exactly the module classes of the full model
    (bar those it declares it leaves out), and its norm layers exactly the classes and settings
    (eps, momentum, affine, ...) of the full model's. Both are built on the meta device: no
    weights, little time."""
    tv = import_torchvision()
    regnet = tv.models.regnet
    from_init_params = regnet.BlockParams.from_init_params

    def on_cpu(*args, **kwargs):  # RegNet's builder reads its widths back from a tensor: not on meta
        with torch.device("cpu"):
            return from_init_params(*args, **kwargs)

    reduced = [s for s in torchvision_specs().values() if s.reduced]
    assert len(reduced) >= 30
    problems = []
    with mock.patch.object(regnet.BlockParams, "from_init_params", on_cpu), torch.device("meta"):
        for spec in reduced:
            full_classes, full_norms = layer_kinds(tv.models.get_model(spec.name, weights=None, num_classes=10))
            classes, norms = layer_kinds(spec.construct())
            left_out = (full_classes - classes - set(spec.leaves_out)) | (full_norms - norms)
            added = (classes - full_classes) | (norms - full_norms)
            if left_out or added or set(spec.leaves_out) - full_classes:
                problems.append(f"{spec.model}: leaves out {left_out or '-'} (declared: {spec.leaves_out or '-'}), "
                                f"adds {added or '-'}")
    assert not problems, problems


@pytest.mark.parametrize("spec", specs(), ids=lambda s: s.model)
def test_converted_model_computes_what_the_original_computes(spec, torch_backend):
    # fastpurify's PyTorch path, as on a user's CPU (the interpreted Triton kernels are the kernel
    # tests' subject, and would take minutes here)
    check_exact(spec)
