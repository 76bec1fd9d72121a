import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify._torchvision import import_torchvision
from fastpurify.models import small_cnn
from fastpurify.reference import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyLayerNorm, to_noisy
from fastpurify.reference.noisy_layers import set_perturbed


class Mixed(nn.Module):
    """A BatchNorm2d and a BatchNorm1d (the official NoisyBatchNorm1d case)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)


def test_swap_keeps_names_weights_and_outputs():
    model = Mixed()
    _randomise_bn(model)
    noisy_model = copy.deepcopy(model)
    layers = to_noisy(noisy_model)
    assert list(layers) == ["bn", "head.2"]
    assert isinstance(noisy_model.bn, NoisyBatchNorm2d) and isinstance(noisy_model.head[2], NoisyBatchNorm1d)
    x = torch.rand(8, 1, 4, 4)
    for train in (False, True):
        model.train(train), noisy_model.train(train)
        for perturbed in (False, True):  # mask 1, zero noise: the original function either way
            set_perturbed(layers, perturbed)
            torch.testing.assert_close(noisy_model(x), model(x), rtol=1e-6, atol=1e-6)
    # the two training-mode forwards of each updated the running statistics identically
    torch.testing.assert_close(noisy_model.bn.running_var, model.bn.running_var)
    assert int(noisy_model.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("train", [True, False])
def test_perturbed_forward_is_the_official_formula(train):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    _randomise_bn(nn.Sequential(bn))
    (layer,) = to_noisy(nn.Sequential(bn)).values()
    layer.train(train)
    with torch.no_grad():
        layer.neuron_mask.uniform_(0, 1)
        layer.neuron_noise.uniform_(-0.4, 0.4)
        layer.neuron_noise_bias.uniform_(-0.4, 0.4)
    x = torch.randn(6, 4, 3, 3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for perturbed in (True, False):
        layer.perturbed = perturbed
        scale = layer.weight * (layer.neuron_mask + layer.neuron_noise * perturbed)
        shift = layer.bias * (1 + layer.neuron_noise_bias * perturbed)
        if train:
            mu, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        else:
            mu, var = rm, rv
        expected = (x - mu[:, None, None]) / torch.sqrt(var[:, None, None] + layer.eps) * scale[:, None, None] \
            + shift[:, None, None]
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_cumulative_average_and_untracked_statistics_behave_as_torch():
    for kwargs in (dict(momentum=None), dict(track_running_stats=False)):
        bn = nn.BatchNorm2d(3, **kwargs)
        model = nn.Sequential(copy.deepcopy(bn))
        to_noisy(model)
        x = torch.randn(5, 3, 2, 2)
        for _ in range(3):
            torch.testing.assert_close(model(x), bn(x))
        for name, buf in bn.named_buffers():
            torch.testing.assert_close(model[0].get_buffer(name), buf)


def test_torchvision_model_is_swapped_under_its_own_names():
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=4)
    layers = to_noisy(model)
    assert "layer1.0.bn1" in layers and "bn1" in layers and len(layers) == 20
    assert all(isinstance(m, NoisyBatchNorm2d) for name, m in model.named_modules() if name in layers)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(InputError, match=r"no layer to mask among batchnorm, layernorm, groupnorm.*conv_linear"):
        to_noisy(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True)))
    with pytest.raises(InputError, match=r"layer '1' \(torch.nn.modules.batchnorm.BatchNorm2d\) has no scale.*leave "
                                         r"'batchnorm' out of mask_layers \(mask_layers options: 'batchnorm', "
                                         r"'layernorm', 'groupnorm'"):
        to_noisy(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False)))
    model = small_cnn(num_classes=3, in_channels=1, width=4)
    to_noisy(model)  # ours work as well
    assert sum(isinstance(m, NoisyBatchNorm2d) for m in model.modules()) == 4


def _randomise_noise(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.neuron_mask, layer.neuron_noise, layer.neuron_noise_bias):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.8 - (0.0 if p is layer.neuron_mask else 0.4))


def test_layer_norms_perturb_gamma_and_beta_per_feature():
    ln, ln2d = nn.LayerNorm(6), import_torchvision().models.convnext.LayerNorm2d(5)
    for m in (ln, ln2d):
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.5, 0.5)
    model = nn.ModuleDict({"ln": copy.deepcopy(ln), "ln2d": copy.deepcopy(ln2d)})
    layers = to_noisy(model)
    assert list(layers) == ["ln", "ln2d"] and all(isinstance(m, NoisyLayerNorm) for m in layers.values())
    _randomise_noise(layers)
    x, x2 = torch.randn(3, 4, 6), torch.randn(2, 5, 3, 3)
    for perturbed in (False, True):
        set_perturbed(layers, perturbed)
        for name, ref, inp, axis in (("ln", ln, x, -1), ("ln2d", ln2d, x2, 1)):
            layer = layers[name]
            scale = ref.weight * (layer.neuron_mask + layer.neuron_noise * perturbed)
            shift = ref.bias * (1 + layer.neuron_noise_bias * perturbed)
            moved = inp.movedim(axis, -1)
            mu, var = moved.mean(-1, keepdim=True), moved.var(-1, unbiased=False, keepdim=True)
            expected = ((moved - mu) / torch.sqrt(var + ref.eps) * scale + shift).movedim(-1, axis)
            torch.testing.assert_close(layer(inp), expected, rtol=1e-5, atol=1e-5)


def test_conv_and_linear_scale_the_weight_of_each_output_channel():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3), nn.Linear(3, 2))
    reference = copy.deepcopy(model)
    layers = to_noisy(model, ("conv_linear",))
    assert list(layers) == ["0", "2"]  # the last Linear (the classifier) is not masked
    _randomise_noise(layers)
    set_perturbed(layers, True)
    x = torch.randn(5, 2, 4, 4)
    conv, lin = layers["0"], layers["2"]
    w0 = reference[0].weight * (conv.neuron_mask + conv.neuron_noise).view(-1, 1, 1, 1)
    h = F.conv2d(x, w0, reference[0].bias * (1 + conv.neuron_noise_bias)).flatten(1)
    w2 = reference[2].weight * (lin.neuron_mask + lin.neuron_noise)[:, None]
    expected = reference[3](F.linear(h, w2, reference[2].bias * (1 + lin.neuron_noise_bias)))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
