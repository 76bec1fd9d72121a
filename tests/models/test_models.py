import pytest
import torch
import torch.nn as nn

from fastpurify.models import available_models, build_model, cifar_resnet18, preact_resnet18, small_cnn
from fastpurify.validation import InputError


def bn_channels(model):
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_cifar_resnet18_matches_official_anp_model():
    model = cifar_resnet18(num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and bn_channels(model) == 4800
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert isinstance(model.layer2[0].shortcut[1], nn.BatchNorm2d)  # BN in projection shortcuts
    names = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer4.1.bn2.weight",
            "linear.bias"} <= names
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the well-known CIFAR ResNet-18 size


def test_preact_resnet18_structure():
    model = preact_resnet18(num_classes=10)
    # bn1 sees the block's input width, bn2 its output width; no BN in shortcuts or after the last block
    assert bn_channels(model) == 256 + (64 + 3 * 128) + (128 + 3 * 256) + (256 + 3 * 512) == 3392
    assert model.layer2[0].shortcut is not None and not any(
        isinstance(m, nn.BatchNorm2d) for m in model.layer2[0].shortcut.modules())
    assert "layer3.0.shortcut.0.weight" in model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 11_171_146  # BackdoorBench's PreActResNet18


@pytest.mark.parametrize("build", [cifar_resnet18, preact_resnet18, small_cnn])
@pytest.mark.parametrize("in_channels, size, classes", [(3, 32, 10), (1, 16, 7), (2, 20, 43)])
def test_forward_any_size_channels_classes(build, in_channels, size, classes):
    model = build(num_classes=classes, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, size, size))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn"])
def test_torchvision_models_build_by_name(name):
    model = build_model(f"torchvision:{name}", num_classes=10).eval()
    assert bn_channels(model) > 0
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_model_names():
    names = available_models()
    assert {"cifar_resnet18", "preact_resnet18", "small_cnn", "torchvision:resnet50"} <= set(names)
    with pytest.raises(InputError, match="unknown model"):
        build_model("resnet9000")
    with pytest.raises(InputError, match="no classifier"):
        build_model("torchvision:notanet")
    with pytest.raises(InputError, match="3-channel"):
        build_model("torchvision:resnet18", in_channels=1)
    with pytest.raises(InputError, match="num_classes"):
        build_model("small_cnn", num_classes=1)
