"""Every norm layer ANP masks, converted: exactly the original with mask 1 and no noise (train and
eval), the ANP rule when perturbed, each batch group on its own statistics, and which path each
layer takes (fused for the exact types written for, generic otherwise) -- or a clear refusal."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpurify._torchvision import import_torchvision
from fastpurify.layers import convert, layer_path, layer_paths, perturbed_layers
from fastpurify.neurons import neuron_layers
from fastpurify.validation import InputError

from .devices import TEST_DEVICE, float64_tol, on_device


def timm_layers():
    import_torchvision()  # timm imports torchvision, whose compiled ops may not load beside a CPU torch
    timm = pytest.importorskip("timm", reason="timm is a test dependency (pyproject's [test] extra)")
    return timm.layers


class ShiftedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: the generic path must run it as it is."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


class WeightBufferNorm(nn.Module):
    """A norm layer whose scale is a buffer: nothing ANP can learn a mask for."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("weight", torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.group_norm(x, 1, self.weight, self.bias)


def randomise(module, seed=0):
    """Scales far from 1 and shifts far from 0 (a dropped or doubled affine cannot hide), moved running stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, nn.Parameter) and w.dim() == 1:
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
                if isinstance(b, nn.Parameter):
                    b.copy_(torch.randn(b.shape, generator=g))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def norm_cases():
    """(id, a model around one norm layer, input shape, expected path) for every norm ANP masks."""
    L = timm_layers()
    conv = lambda c: nn.Conv2d(3, c, 3, padding=1)  # noqa: E731
    cases = [
        ("BatchNorm2d", nn.Sequential(conv(6), nn.BatchNorm2d(6)), (4, 3, 5, 5), "fused"),
        ("GroupNorm", nn.Sequential(conv(6), nn.GroupNorm(3, 6)), (4, 3, 5, 5), "fused"),
        ("GroupNorm-1", nn.Sequential(conv(6), nn.GroupNorm(1, 6)), (4, 3, 5, 5), "fused"),
        ("timm.BatchNormAct2d", nn.Sequential(conv(6), L.BatchNormAct2d(6, act_layer=nn.GELU)), (4, 3, 5, 5),
         "fused"),
        ("timm.BatchNormAct2d-drop", nn.Sequential(conv(6), L.BatchNormAct2d(6, drop_layer=lambda: nn.Dropout(0.5))),
         (4, 3, 5, 5), "fused"),
        ("timm.GroupNormAct", nn.Sequential(conv(6), L.GroupNormAct(6, num_groups=2, act_layer=nn.SiLU)),
         (4, 3, 5, 5), "fused"),
        ("timm.GroupNorm1Act", nn.Sequential(conv(6), L.GroupNorm1Act(6)), (4, 3, 5, 5), "fused"),
        ("timm.GroupNorm1", nn.Sequential(conv(6), L.GroupNorm1(6)), (4, 3, 5, 5), "fused"),
        ("timm.LayerNorm", nn.Sequential(nn.Linear(5, 6), L.LayerNorm(6)), (4, 7, 5), "fused"),
        ("timm.LayerNorm2d", nn.Sequential(conv(6), L.LayerNorm2d(6)), (4, 3, 5, 5), "fused"),
        ("timm.LayerNormAct", nn.Sequential(nn.Linear(5, 6), L.LayerNormAct(6, act_layer=nn.GELU)), (4, 7, 5),
         "fused"),
        ("timm.LayerNormAct2d", nn.Sequential(conv(6), L.LayerNormAct2d(6)), (4, 3, 5, 5), "fused"),
        ("timm.LayerNormFp32", nn.Sequential(nn.Linear(5, 6), L.LayerNormFp32(6)), (4, 7, 5), "generic"),
        ("timm.RmsNorm", nn.Sequential(nn.Linear(5, 6), L.RmsNorm(6)), (4, 7, 5), "generic"),
        ("timm.RmsNorm2d", nn.Sequential(conv(6), L.RmsNorm2d(6)), (4, 3, 5, 5), "generic"),
        ("timm.SimpleNorm", nn.Sequential(nn.Linear(5, 6), L.SimpleNorm(6)), (4, 7, 5), "generic"),
        ("BatchNorm3d", nn.Sequential(nn.Conv3d(3, 6, 1), nn.BatchNorm3d(6)), (4, 3, 2, 3, 3), "generic"),
        ("BatchNorm-subclass", nn.Sequential(conv(6), ShiftedBatchNorm(6)), (4, 3, 5, 5), "generic"),
    ]
    if hasattr(nn, "RMSNorm"):
        cases.append(("RMSNorm", nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6)), (4, 7, 5), "generic"))
    return cases


CASE_IDS = [c[0] for c in norm_cases()]


def case(name):
    return next(c for c in norm_cases() if c[0] == name)


def run_both(model, converted, x, train):
    model.train(train)
    converted.train(train)
    with torch.no_grad():
        torch.manual_seed(5)  # the same dropout draws on both sides
        expected = model(x)
        torch.manual_seed(5)
        return expected, converted(x)


@pytest.mark.parametrize("name", CASE_IDS)
def test_converted_norm_is_exactly_the_original(name, backend):
    _, model, shape, path = case(name)
    if backend == "triton" and path == "generic":
        pytest.skip("the generic path runs the layer's own forward: no kernel involved")
    model = randomise(model).double().to(TEST_DEVICE)
    converted = convert(model)
    (layer,) = perturbed_layers(converted).values()
    assert layer.path == path and layer_path(model[1]) == path
    assert isinstance(layer, type(model[1])) or path == "fused"
    x = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for train in (False, True):
        expected, got = run_both(model, converted, x, train)
        # The PyTorch path calls the same ops with the same values: bitwise. The kernels: float64
        # rounding, and compiled the float32 rounding of eps and momentum (an H200: up to 1.2e-11
        # in the outputs, more in the running statistics).
        tol = 0 if backend == "torch" else float64_tol(backend)
        assert torch.allclose(got, expected, rtol=tol, atol=tol), (name, train, (got - expected).abs().max())
    for a, b in zip(model.buffers(), converted.buffers()):
        assert torch.allclose(a, b, rtol=tol, atol=tol)  # running statistics moved identically
    assert set(converted.state_dict()) == set(model.state_dict()) | {"1.neuron_mask"}


@pytest.mark.parametrize("name", ["timm.BatchNormAct2d", "GroupNorm", "timm.LayerNormAct2d", "timm.RmsNorm",
                                  "BatchNorm-subclass", "timm.LayerNormFp32"])
def test_perturbed_norm_applies_the_anp_rule_per_batch_group(name):
    """Group g of a two-group batch = the original layer with weight * (m + delta_g) and bias *
    (1 + xi_g) on that group alone (its own batch statistics)."""
    _, model, shape, _ = case(name)
    model = randomise(model).double()
    converted = convert(model)
    (layer,) = perturbed_layers(converted).values()
    c = layer.num_neurons
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(c, generator=g, dtype=torch.float64)
    noise, noise_bias = torch.zeros(2, c, dtype=torch.float64), torch.zeros(2, c, dtype=torch.float64)
    noise[1], noise_bias[1] = torch.rand(c, generator=g) - 0.5, torch.rand(c, generator=g) - 0.5
    with torch.no_grad():
        layer.neuron_mask.copy_(mask)
    layer.noise, layer.noise_bias, layer.batch_groups, layer.perturbed = noise, noise_bias, 2, True
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    model.train()
    converted.train()
    with torch.no_grad():
        got = converted(torch.cat([x, x]))
        norm = model[1]
        weight, bias = norm.weight.clone(), None if getattr(norm, "bias", None) is None else norm.bias.clone()
        for group in range(2):
            norm.weight.copy_(weight * (mask + noise[group]))
            if bias is not None:
                norm.bias.copy_(bias * (1 + noise_bias[group]))
            expected = model(x)
            n = shape[0]
            assert torch.allclose(got[group * n:(group + 1) * n], expected, rtol=1e-12, atol=1e-12), (name, group)
        norm.weight.copy_(weight)
    # The mask's gradient reaches the mask through whichever path the layer took.
    layer.noise, layer.noise_bias, layer.batch_groups = noise[1], noise_bias[1], 1
    converted.zero_grad()
    converted(x).square().sum().backward()
    assert layer.neuron_mask.grad is not None and layer.neuron_mask.grad.abs().sum() > 0


def test_norm_act_keeps_its_activation_and_drop():
    L = timm_layers()
    bn = L.BatchNormAct2d(4, act_layer=nn.Hardswish, drop_layer=lambda: nn.Dropout(0.3))
    converted = convert(nn.Sequential(bn))[0]
    assert type(converted.act) is nn.Hardswish and type(converted.drop) is nn.Dropout
    assert converted.act is not bn.act  # a copy: the user's layer is untouched
    assert type(bn).__name__ == "BatchNormAct2d"


def test_timm_fast_norm_takes_the_generic_path():
    L = timm_layers()
    ln = L.LayerNorm(6)
    assert layer_path(ln) == "fused"
    ln._fast_norm = True  # its forward is timm's fast_layer_norm then, not F.layer_norm
    assert layer_path(ln) == "generic"
    converted = convert(nn.Sequential(nn.Linear(3, 6), ln))
    assert converted[1].path == "generic"


def test_layer_paths_count_each_path():
    L = timm_layers()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), L.BatchNormAct2d(4), nn.GroupNorm(2, 4),
                          L.RmsNorm2d(4), ShiftedBatchNorm(4), nn.Conv2d(4, 2, 1))
    assert layer_paths(convert(model)) == {"fused": 3, "generic": 2}
    assert layer_paths(convert(model, mask_layers="groupnorm,conv_linear")) == {"fused": 1, "conv_linear": 1}
    assert list(neuron_layers(model)) == ["1", "2", "3", "4", "5"]


def test_layers_that_cannot_be_perturbed_are_refused_by_name():
    with pytest.raises(InputError, match=r"layer '1' \(.*WeightBufferNorm\)|no layer to mask"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 1), WeightBufferNorm(4)))
    L = timm_layers()
    rms = L.RmsNorm(6)
    rms.weight = nn.Parameter(torch.ones(2, 3))  # not one value per feature
    with pytest.raises(InputError, match=r"layer '1' \(timm\.layers\.norm\.RmsNorm\) cannot be perturbed: .* "
                                         r"parameter of shape \(2, 3\); leave 'layernorm' out of mask_layers"):
        convert(nn.Sequential(nn.Linear(3, 6), rms))
    gn = nn.GroupNorm(2, 4, affine=False)
    with pytest.raises(InputError, match=r"layer '1' \(torch.nn.modules.normalization.GroupNorm\) has no scale.*"
                                         r"leave 'groupnorm' out of mask_layers"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 1), gn))
    # Left out of mask_layers, the same model converts (its other norms masked).
    assert list(perturbed_layers(convert(nn.Sequential(nn.Conv2d(3, 4, 1), gn, nn.BatchNorm2d(4)),
                                         mask_layers="batchnorm"))) == ["2"]


def test_anp_mode_keeps_norm_act_dropout_off():
    from fastpurify.inference import anp_mode

    L = timm_layers()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), L.BatchNormAct2d(4, drop_layer=lambda: nn.Dropout(0.5)))
    anp_mode(model)
    assert model[1].training and not model[1].drop.training and not model[1].act.training
