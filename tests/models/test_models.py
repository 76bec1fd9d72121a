import sys

import pytest
import torch
import torch.nn as nn

from fastpurify.models import (available_models, build_model, cifar_resnet18, preact_resnet18, small_cnn,
                               small_cnn_wide)
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


@pytest.mark.parametrize("build", [cifar_resnet18, preact_resnet18, small_cnn, small_cnn_wide])
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
    assert {"cifar_resnet18", "preact_resnet18", "small_cnn", "small_cnn_wide", "torchvision:resnet50"} <= set(names)
    assert build_model("small_cnn_wide").features[0].out_channels == 32
    with pytest.raises(InputError, match="unknown model.*'timm:<name>'"):
        build_model("resnet9000")
    with pytest.raises(InputError, match="no classifier"):
        build_model("torchvision:notanet")
    with pytest.raises(InputError, match="3-channel"):
        build_model("torchvision:resnet18", in_channels=1)
    with pytest.raises(InputError, match="num_classes"):
        build_model("small_cnn", num_classes=1)


def test_timm_models_build_by_name():
    model = build_model("timm:resnet10t", num_classes=7, in_channels=1).eval()
    assert type(model).__module__.startswith("timm.") and bn_channels(model) > 0
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    # timm's own constructor arguments pass through
    vit = build_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=32, depth=1).eval()
    with torch.no_grad():
        assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_timm_model_errors(monkeypatch):
    with pytest.raises(InputError, match=r"timm has no model named 'resnt18'; close names: resnet18.*"
                                         r"timm\.list_models\('\*resnt18\*'\)"):
        build_model("timm:resnt18")
    with pytest.raises(InputError, match="never downloads"):
        build_model("timm:resnet10t", pretrained=True)
    with pytest.raises(InputError, match="num_classes"):
        build_model("timm:resnet10t", num_classes=0)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(InputError, match=r"not installed: pip install timm"):
        build_model("timm:resnet10t")


def test_timm_checkpoint_round_trip(tmp_path):
    """A checkpoint that records a timm architecture loads back by that name, as the CLI loads --model."""
    from fastpurify.checkpoint import load_model, save_model

    model = build_model("timm:resnet10t", num_classes=5, in_channels=1)
    path = save_model(model, tmp_path / "m.safetensors",
                      metadata={"arch": "timm:resnet10t", "num_classes": 5, "in_channels": 1})
    loaded, meta = load_model(path)
    assert meta["arch"] == "timm:resnet10t" and type(loaded) is type(model)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
