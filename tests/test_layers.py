import pytest
import torch
import torch.nn as nn

from fastpurify.layers import PerturbedBatchNorm1d, PerturbedBatchNorm2d, convert, perturbed_layers
from fastpurify.models import build_model
from fastpurify.validation import InputError

from .devices import TEST_DEVICE, on_device


def randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def check_identical(name, backend_name, monkeypatch, size=16, channels_last=False, batch=2):
    monkeypatch.setenv("FASTPURIFY_BACKEND", backend_name)
    in_channels = 3
    model = randomise_bn(build_model(name, num_classes=10, in_channels=in_channels)).to(TEST_DEVICE)
    converted = convert(model)
    # In float64: train-mode BatchNorm over the 2 values per channel of the deepest layers amplifies
    # rounding (float32 differs by 1e-3 after 50 such layers, float64 by 1e-6); a real error is O(1).
    model, converted = model.double(), converted.double()
    x = on_device(torch.rand(batch, in_channels, size, size, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64))
    if channels_last:
        model, converted = model.to(memory_format=torch.channels_last), converted.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for train in (False, True):
        model.train(train)
        converted.train(train)
        with torch.no_grad():
            torch.manual_seed(2)  # the same dropout masks on both sides
            expected = model(x)
            torch.manual_seed(2)
            got = converted(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (name, train, (got - expected).abs().max())
    # Running statistics moved identically in the training pass.
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for n in bn_names:
        a, b = model.get_submodule(n), converted.get_submodule(n)
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet18", "preact_resnet18"])
def test_our_models_unchanged_on_both_backends(name, backend, monkeypatch):
    # channels_last lets each interpreted program cover many channels: fewer programs, faster CI
    check_identical(name, backend, monkeypatch, size=8, channels_last=backend == "triton")


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
                                  "torchvision:vgg11_bn"])
def test_torchvision_models_unchanged(name, backend, monkeypatch):
    # On a GPU, cuDNN's float64 convolutions sum in other orders than the CPU's, and two values a
    # channel in the deepest layers amplify that to 1e-2 (seen on an H100 for ResNet-50 and
    # MobileNetV2): there, 4 images of 64 px keep every layer at 16 values a channel or more.
    cuda = TEST_DEVICE.type == "cuda"
    check_identical(name, backend, monkeypatch, size=64 if cuda else 32, batch=4 if cuda else 2,
                    channels_last=backend == "triton")


def test_conversion_keeps_the_model_and_adds_only_the_mask():
    model = randomise_bn(build_model("cifar_resnet18")).to(TEST_DEVICE)
    model.layer1[0].bn1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert not any(isinstance(m, (PerturbedBatchNorm2d, PerturbedBatchNorm1d)) for m in model.modules())
    keys = set(converted.state_dict())
    masks = {k for k in keys if k.endswith("neuron_mask")}
    assert keys - masks == set(before) and len(masks) == 20
    layers = perturbed_layers(converted)
    assert list(layers)[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert sum(m.num_features for m in layers.values()) == 4800
    assert not converted.layer1[0].bn1.weight.requires_grad and converted.layer1[0].bn2.weight.requires_grad
    assert all(torch.equal(m.neuron_mask, torch.ones(m.num_features, device=TEST_DEVICE)) for m in layers.values())


def test_batchnorm1d_and_two_group_forward(backend):
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).to(TEST_DEVICE)
    converted = convert(model)
    bn = converted[1]
    assert isinstance(bn, PerturbedBatchNorm1d)
    x = on_device(torch.randn(8, 6))
    clean = converted(x[:4]).detach()
    noise, noise_bias = torch.zeros(2, 5, device=TEST_DEVICE), torch.zeros(2, 5, device=TEST_DEVICE)
    noise[1], noise_bias[1] = 0.3, -0.2
    bn.noise, bn.noise_bias, bn.batch_groups, bn.perturbed = noise, noise_bias, 2, True
    both = converted(torch.cat([x[:4], x[:4]]))
    assert torch.allclose(both[:4], clean, atol=1e-5)  # group 0 is the clean pass
    bn.noise, bn.noise_bias, bn.batch_groups = noise[1:], noise_bias[1:], 1
    assert torch.allclose(both[4:], converted(x[:4]), atol=1e-5)  # group 1 is the perturbed pass
    bn.perturbed = False
    assert torch.allclose(converted(x[:4]), clean, atol=1e-5)


def test_momentum_none_is_a_cumulative_average(backend):
    bn = nn.BatchNorm2d(3, momentum=None).to(TEST_DEVICE)
    converted = convert(nn.Sequential(bn))
    for seed in range(3):
        x = on_device(torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(seed)))
        bn(x)
        converted(x)
    assert torch.allclose(converted[0].running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(converted[0].running_var, bn.running_var, atol=1e-6)


def test_models_with_nothing_to_mask_name_the_options():
    # Conversion errors from the model's structure alone: CPU modules on every TEST_DEVICE.
    with pytest.raises(InputError, match=r"no layer to mask among batchnorm, layernorm, groupnorm.*"
                                         r"mask_layers=\('conv_linear',\).*--mask-layers conv_linear.*present in this "
                                         r"model: conv_linear"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True)))
    with pytest.raises(InputError, match=r"normalises over \(4, 2, 2\); fastpurify masks LayerNorms over one"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 2, 2])))
    with pytest.raises(InputError, match="elementwise_affine=False"):
        convert(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False)))
    with pytest.raises(InputError, match="mask_layers must name one or more of batchnorm, layernorm, groupnorm, "
                                         "conv_linear; got instancenorm"):
        convert(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), mask_layers=("instancenorm",))
    with pytest.raises(InputError, match="already converted"):
        convert(convert(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))))
