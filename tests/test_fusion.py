"""The ReLU folded into the perturbed BatchNorm before it (fastpurify.fusion): which ReLUs fold, the
same function and gradients as the unfused network (float64, both backends, ANP's perturbed
two-group batch), what stays unfused, and the ANP engine with it equal to the reference."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpurify
from fastpurify.arena import NeuronArena
from fastpurify.fusion import fuse_batch_norm_relu
from fastpurify.inference import anp_mode
from fastpurify.layers import convert, perturbed_layers
from fastpurify.models import build_model
from fastpurify.reference import anp as reference_anp

from .devices import on_device
from .stubs import CalledTwice


def converted(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=3, **kw).double()
    return on_device(anp_mode(convert(model)))


def perturb(model, groups=2, seed=1):
    """Every perturbed layer on ``groups`` batch groups with random noise rows, as ANP runs them."""
    g = torch.Generator().manual_seed(seed)
    for layer in perturbed_layers(model).values():
        c = layer.num_neurons
        layer.noise = on_device(torch.rand(groups, c, generator=g, dtype=torch.float64) * 0.8 - 0.4)
        layer.noise_bias = on_device(torch.rand(groups, c, generator=g, dtype=torch.float64) * 0.8 - 0.4)
        layer.batch_groups, layer.perturbed = groups, True


def outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    masks = [layer.neuron_mask for layer in perturbed_layers(model).values()]
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                [x, *masks])
    return y.detach(), grads


@pytest.mark.parametrize("name,expected,backend", [
    ("cifar_resnet18", (17, 8), "triton"), ("small_cnn", None, "triton"), ("preact_resnet18", (16, 0), "torch"),
    ("torchvision:resnet18", (17, 8), "torch"), ("torchvision:resnet50", (49, 16), "torch")])
def test_the_fused_network_computes_the_same(name, expected, backend, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_BACKEND", backend)
    plain = converted(name)
    fused, count = fuse_batch_norm_relu(converted(name))
    residuals = sum(layer.fused_residual for layer in perturbed_layers(fused).values())
    if expected is not None:  # ResNets: the stem and each block's BNs, the last with the residual add before
        assert (count, residuals) == expected  # its ReLU (a downsampling shortcut's BN is its residual); PreAct:
    assert count > 0 and sum(layer.fused_relu for layer in perturbed_layers(fused).values()) == count  # all, no add
    assert list(perturbed_layers(fused)) == list(perturbed_layers(plain))  # the same layers, the same names
    for model in (plain, fused):
        perturb(model)
    x = on_device(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    (y0, g0), (y1, g1) = outputs_and_grads(plain, x), outputs_and_grads(fused, x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert NeuronArena(fused).num_neurons == NeuronArena(plain).num_neurons


class TwoUses(nn.Module):
    """A BatchNorm whose output feeds a ReLU and the residual: the ReLU must stay apart."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = F.relu(y) + y
        return self.act(self.bn2(z)).mean((2, 3))


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return y.mean((2, 3)) if float(x.sum()) > 0 else -y.mean((2, 3))


def test_a_norm_the_model_calls_twice_is_not_folded():
    plain = anp_mode(convert(CalledTwice()))
    fused, count = fuse_batch_norm_relu(copy.deepcopy(plain))
    assert count == 0 and not fused.bn.fused_relu
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), plain(x))


def test_only_a_relu_that_is_all_the_norm_feeds_is_folded():
    plain = anp_mode(convert(TwoUses()))
    fused, count = fuse_batch_norm_relu(copy.deepcopy(plain))
    assert count == 1 and not fused.bn.fused_relu and fused.bn2.fused_relu  # nn.ReLU(inplace) after bn2 only
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), plain(x))


class Stateful(nn.Module):
    """Python-side state: fx bakes in the branch its trace took (the first call's)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.calls = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), 0

    def forward(self, x):
        self.calls += 1
        return F.relu(self.bn(self.conv(x))).mean((2, 3)) * (2.0 if self.calls > 1 else 1.0)


def test_a_model_traced_otherwise_than_it_runs_is_left_unfolded_with_a_warning():
    model = anp_mode(convert(Stateful()))
    with pytest.warns(RuntimeWarning, match="computes other outputs than the model"):
        same, count = fuse_batch_norm_relu(model, torch.rand(2, 3, 5, 5))
    assert same is model and count == 0 and not model.bn.fused_relu and not model.bn.fused_residual


def test_the_check_on_a_sample_keeps_a_faithful_fold(recwarn):
    sample = on_device(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    fused, count = fuse_batch_norm_relu(converted("cifar_resnet18"), sample)
    layers = perturbed_layers(fused).values()
    assert count == 17 and sum(layer.fused_relu for layer in layers) == 17
    assert sum(layer.fused_residual for layer in layers) == 8
    assert not [w for w in recwarn.list if "computes other outputs" in str(w.message)]


def test_an_untraceable_model_is_left_as_it_is():
    model = anp_mode(convert(Branchy()))
    same, count = fuse_batch_norm_relu(model)
    assert same is model and count == 0 and not model.bn.fused_relu


def test_the_training_flags_stay_each_layers_own():
    fused, _ = fuse_batch_norm_relu(converted("cifar_resnet18"))
    assert all(layer.training for layer in perturbed_layers(fused).values())  # ANP's batch statistics
    assert not fused.training  # the rest in eval mode, as anp_mode left it


@pytest.mark.parametrize("name,backend", [("small_cnn", "triton"), ("torchvision:resnet18", "torch")])
def test_anp_with_folded_relus_equals_the_reference(name, backend, monkeypatch):
    """The engine with ``fused_relu=True`` against the reference, float64: the kernels (on the
    interpreter) on the small CNN; the ResNet's wiring on the PyTorch path (its kernels' results
    are checked layer by layer above)."""
    monkeypatch.setenv("FASTPURIFY_BACKEND", backend)
    torch.manual_seed(0)
    kw = dict(width=8) if name == "small_cnn" else {}
    model = build_model(name, num_classes=10, in_channels=3, **kw).double()
    g = torch.Generator().manual_seed(0)
    data = torch.rand(24, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (24,), generator=g)
    settings = dict(iterations=2, batch_size=8, steps=2, progress=False, seed=3)
    ref = reference_anp(model, data, **settings)
    fast = fastpurify.anp(model, data, device="cpu", fused_relu=True, **settings)
    assert fast.engine["fused_relus"] > 0
    assert fast.engine["fused_residuals"] == (8 if name == "torchvision:resnet18" else 0)  # each block's end
    assert max(float((ref.masks[k] - fast.masks[k]).abs().max()) for k in ref.masks) < 1e-6
