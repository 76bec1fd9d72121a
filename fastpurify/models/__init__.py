"""Model constructors by name.

Our own: ``cifar_resnet18`` (official ANP), ``preact_resnet18`` (PBE / BackdoorBench),
``small_cnn`` and ``small_cnn_wide`` (width 32). Any torchvision classifier by ``torchvision:<name>``
(``torchvision:resnet50``, ``torchvision:mobilenet_v2``, ``torchvision:vgg11_bn``, ...) and, where timm is installed
(``pip install timm``), any timm model by ``timm:<name>`` (``timm:resnet18``,
``timm:efficientnet_b0``, ``timm:vit_tiny_patch16_224``, ...; ``timm.list_models('*part*')`` lists
the names). Both are built freshly initialised: no weights are ever downloaded. No engine requires
our classes: they accept any ``nn.Module`` with normalisation layers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch.nn as nn

from ..validation import InputError, check_num_classes, check_positive_int
from .preact_resnet import PreActResNet, preact_resnet18
from .resnet_cifar import CifarResNet, cifar_resnet18
from .small_cnn import SmallCNN, small_cnn, small_cnn_wide

OWN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "preact_resnet18": preact_resnet18,
    "small_cnn": small_cnn,
    "small_cnn_wide": small_cnn_wide,
}
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def available_models() -> list[str]:
    """Our model names plus the torchvision classifiers, each prefixed ``torchvision:``.

    timm's ~1300 models are not listed: any ``timm:<name>`` with a name from ``timm.list_models()``
    is accepted by :func:`build_model`."""
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
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX):], num_classes, in_channels, **kwargs)
    raise InputError(f"unknown model {name!r}: choose one of {sorted(OWN_MODELS)}, 'torchvision:<name>' or "
                     "'timm:<name>'")


def _build_timm(arch: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, ...)``: timm's own init, ``in_chans`` passed through."""
    from .._torchvision import import_torchvision

    import_torchvision()  # timm imports torchvision: declare its missing operators first where needed
    try:
        import timm
    except ImportError:
        raise InputError(f"timm:{arch} needs timm, which is not installed: pip install timm") from None
    if "pretrained" in kwargs:
        raise InputError("build_model never downloads weights (timm models are built with pretrained=False); "
                         "load trained weights from a checkpoint instead")
    if not arch or not timm.is_model(arch):
        part = arch.split(".")[0].split("_")[0]  # the family: vit, resnet, efficientnet, ...
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        raise InputError(f"timm has no model named {arch!r}" + (f"; close names: {', '.join(close)}" if close else "")
                         + f"; list the names with timm.list_models('{f'*{part}*' if part else '*'}')")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


__all__ = [
    "TIMM_PREFIX", "TORCHVISION_PREFIX", "CifarResNet", "PreActResNet", "SmallCNN", "available_models", "build_model",
    "cifar_resnet18", "preact_resnet18", "small_cnn", "small_cnn_wide",
]
