import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify._torchvision import import_torchvision
from fastpurify.models import small_cnn
from fastpurify.reference import NoisyBatchNorm1d, NoisyBatchNorm2d, to_noisy
from fastpurify.reference.noisy_bn import set_perturbed


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
    with pytest.raises(InputError, match=r"no BatchNorm layer.*nn.BatchNorm1d and nn.BatchNorm2d"):
        to_noisy(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2)))
    with pytest.raises(InputError, match=r"'1' is a BatchNorm3d; ANP supports nn.BatchNorm1d and nn.BatchNorm2d"):
        to_noisy(nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)))
    with pytest.raises(InputError, match="no affine parameters"):
        to_noisy(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False)))
    model = small_cnn(num_classes=3, in_channels=1, width=4)
    to_noisy(model)  # ours work as well
    assert sum(isinstance(m, NoisyBatchNorm2d) for m in model.modules()) == 4
