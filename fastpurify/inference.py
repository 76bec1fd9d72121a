"""Batched inference that leaves the model as it found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .neurons import layer_kind


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model with none):
    the dtype the engines cast their images to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def anp_mode(model: nn.Module) -> nn.Module:
    """ANP's mode: batch-statistics norm layers in training mode (batch statistics, as the official script's
    ``model.train()``), every other module in eval mode, so dropout and stochastic depth (ViT,
    Swin, ConvNeXt) do not randomise the masks' gradients. For the BatchNorm networks of the
    official script, which have neither, this is exactly ``model.train()``."""
    model.eval()
    for m in model.modules():
        if layer_kind(m) == "batchnorm":  # nn.BatchNorm*, subclasses, timm's EvoNorm2dB*
            m.training = True  # the norm only: a norm-act layer's drop and act stay in eval mode
    return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on every parameter, then restore each one's own flag."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def output_classes(model: nn.Module, sample: torch.Tensor) -> int:
    """The number of classes the model outputs, from one eval-mode forward pass on one image."""
    with eval_mode(model):
        logits = model(sample[:1].to(model_device(model)))
    return int(logits.shape[-1])


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, classes) in eval mode, computed in batches on the model's device, returned
    on the images' device in float32 (float64 for a float64 model)."""
    device = model_device(model)
    outs = []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            logits = model(batch)
            outs.append((logits if logits.dtype == torch.float64 else logits.float()).to(images.device))
    return torch.cat(outs)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (N,)."""
    return predict_logits(model, images, batch_size).argmax(dim=1)
