"""Model constructors by name.

Our own: ``cifar_resnet18`` (official ANP), ``preact_resnet18`` (PBE / BackdoorBench) and
``small_cnn``. Any torchvision classifier by ``torchvision:<name>`` (``torchvision:resnet50``,
``torchvision:mobilenet_v2``, ``torchvision:vgg11_bn``, ...). No engine requires our classes:
they accept any ``nn.Module`` with normalisation layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..validation import InputError, check_num_classes, check_positive_int
from .preact_resnet import PreActResNet, preact_resnet18
from .resnet_cifar import CifarResNet, cifar_resnet18
from .small_cnn import SmallCNN, small_cnn

OWN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "preact_resnet18": preact_resnet18,
    "small_cnn": small_cnn,
}
TORCHVISION_PREFIX = "torchvision:"


def available_models() -> list[str]:
    """Our model names plus the torchvision classifiers, each prefixed ``torchvision:``."""
    from .._torchvision import import_torchvision

    tv = import_torchvision()
    return sorted(OWN_MODELS) + [TORCHVISION_PREFIX + n for n in tv.models.list_models(module=tv.models)]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """A freshly initialised model by name (no weights are downloaded)."""
    check_num_classes(num_classes)
    check_positive_int(in_channels, "in_channels")
    if name in OWN_MODELS:
        return OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name.startswith(TORCHVISION_PREFIX):
        from .._torchvision import import_torchvision

        tv = import_torchvision()
        arch = name[len(TORCHVISION_PREFIX):]
        if arch not in tv.models.list_models(module=tv.models):
            raise InputError(f"torchvision has no classifier named {arch!r}; see fastpurify.models.available_models()")
        if in_channels != 3:
            raise InputError(f"torchvision models take 3-channel images, got in_channels={in_channels}; "
                             "load the data with 3 channels (e.g. load_digits(channels=3))")
        return tv.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    raise InputError(f"unknown model {name!r}: choose one of {sorted(OWN_MODELS)} or 'torchvision:<name>'")


__all__ = [
    "CifarResNet", "PreActResNet", "SmallCNN", "available_models", "build_model",
    "cifar_resnet18", "preact_resnet18", "small_cnn",
]
