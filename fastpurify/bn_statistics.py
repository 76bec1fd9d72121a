"""BatchNorm running statistics corrected for a pruning, from the defender's clean images (fastpurify's own).

Pruning a neuron sets its scale to 0, so its channel becomes a constant, and every later BatchNorm
then normalises inputs whose mean and variance have moved with the statistics of the unpruned
network. Part of what a pruning does, to the backdoor and to the clean accuracy alike, is that
mismatch (docs/anp-selection.md, tenth round). The correction measures each BatchNorm's batch
statistics on the defender's clean images in the unpruned and in the pruned network (BatchNorms in
training mode, everything else in eval mode, no gradient) and moves the stored statistics by what
the pruning changed:

    mean' = mean + (mean_pruned - mean_unpruned)
    var'  = var * (var_pruned + eps) / (var_unpruned + eps)        (eps: the layer's own)

The stored statistics, estimated on the whole training set, are kept and only moved: re-estimating
them outright on 500 clean images cost the unpruned CIFAR-10 subjects 2.4-3.2 points of accuracy
(one pass; 0.9-5.2 with ten augmented passes). With nothing pruned the two measurements are the same computation, so the correction is
exactly none. The user's model is never changed: the measurements run on copies, and
:func:`load_statistics` writes into the pruned copy it is given.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .inference import model_device
from .validation import InputError, check_images, check_positive_int

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None}


def require_batch_norms(model: nn.Module, option: str, name: str = "the model") -> None:
    """Refuse ``option`` (a correction of the statistics) for a model with no :func:`batch_norms`."""
    if not batch_norms(model):
        raise InputError(f"{option} corrects BatchNorm running statistics, and {name} has no BatchNorm layer that "
                         "keeps them; drop it")


@torch.no_grad()
def clean_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> Statistics:
    """Each BatchNorm's mean and variance over ``images`` (the cumulative average of its batch
    statistics, batches of ``batch_size`` in order), measured on a copy of ``model`` with its
    BatchNorms in training mode and every other layer in eval mode."""
    check_images(images)
    check_positive_int(batch_size, "batch_size")
    net = copy.deepcopy(model).eval()
    layers = batch_norms(net)
    if not layers:
        raise InputError("the model has no BatchNorm layer with running statistics: there are no statistics to "
                         "correct")
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    device = model_device(net)
    for start in range(0, images.shape[0], batch_size):
        net(images[start:start + batch_size].to(device))
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}


def corrected_statistics(unpruned: nn.Module, pruned: nn.Module, images: torch.Tensor,
                         batch_size: int = 512) -> Statistics:
    """``pruned``'s stored BatchNorm statistics moved by what the pruning changed on ``images``
    (module docstring); ``unpruned`` is the model before pruning, of the same architecture."""
    before = clean_statistics(unpruned, images, batch_size)
    after = clean_statistics(pruned, images, batch_size)
    layers = batch_norms(pruned)
    if set(before) != set(layers):
        raise InputError("the pruned model's BatchNorm layers are not the unpruned model's: give the model the pruning "
                         "started from")
    out = {}
    for name, m in layers.items():
        (mean0, var0), (mean1, var1) = before[name], after[name]
        out[name] = (m.running_mean + (mean1 - mean0), m.running_var * ((var1 + m.eps) / (var0 + m.eps)))
    return out


@torch.no_grad()
def load_statistics(model: nn.Module, statistics: Statistics) -> nn.Module:
    """Write ``statistics`` into ``model``'s BatchNorm running statistics (in place) and return it."""
    layers = batch_norms(model)
    missing = sorted(set(statistics) - set(layers))
    if missing:
        raise InputError(f"the statistics name BatchNorm layers this model does not have: {missing[:3]}; they must "
                         "come from this model's architecture")
    for name, (mean, var) in statistics.items():
        m = layers[name]
        if mean.shape != m.running_mean.shape or var.shape != m.running_var.shape:
            raise InputError(f"the statistics of {name!r} hold {mean.numel()} channels, the layer has "
                             f"{m.running_mean.numel()}")
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return model
