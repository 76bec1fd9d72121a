"""Reference ANP (Wu & Wang, NeurIPS 2021) with the semantics of the official
``optimize_mask_cifar.py``, in plain eager PyTorch.

One iteration, on a copy of the model whose norm layers (BatchNorm, LayerNorm, GroupNorm; with
``mask_layers``, Conv/Linear layers instead or as well) are noisy (``noisy_layers``), BN in training mode (so the copy's running
statistics are updated, as in the script; every other module in eval mode: no dropout, no
stochastic depth, see :func:`fastpurify.inference.anp_mode`), model weights not frozen (they
accumulate gradients that are never used, as in the script):

1. noise reset: delta, xi ~ U(-eps, eps) for every neuron;
2. ``steps`` times: forward perturbed, loss = -CE, backward, every noise gradient replaced by
   its sign, SGD step with lr ``eps / steps`` (no momentum) on the noises; with
   ``clamp_noise`` (the paper's Algorithm 1) the noises are then clamped to [-eps, eps]; the
   script does not clamp (``clamp_noise=False`` reproduces it);
3. forward perturbed, forward clean, loss = alpha * CE_clean + (1 - alpha) * CE_perturbed,
   one backward;
4. SGD on the masks (lr 0.2, momentum 0.9, no weight decay, no dampening, not Nesterov: the
   script's ``torch.optim.SGD(mask_params, lr=args.lr, momentum=0.9)``), then masks clamped
   to [0, 1].

Random draws, in order, per iteration (the contract a fast engine must follow to match):

1. the batch: ``DeviceBatchSampler(images, labels, batch_size, seed=seed, ...).sample()``
   (indices, then crop offsets, then flips, from the sampler's generator ``make_generator(seed)``);
2. the noise, from a second generator ``make_generator(seed + 1, device)``: one
   ``uniform_(-eps, eps)`` into one flat vector of 2P values (the BatchNorm weights' dtype, the
   model's device): every neuron's delta (layers in model order, channels in order), then every
   neuron's xi. (The script draws with the global RNG layer by layer; the distribution is the
   same, only the stream order is fixed here so that engines can reproduce it. Until 2026-11-28
   the deltas and the xis were two draws of P values: on a CPU the same numbers, on a GPU not,
   where one draw is one launch fewer per iteration.)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DeviceBatchSampler, as_tensors, make_generator
from ..inference import anp_mode, model_device, model_dtype
from ..masks import ANPResult
from ..validation import check_anp_settings
from ..neurons import DEFAULT_KINDS, check_kinds, neuron_layers
from .noisy_layers import NoisyLayer, set_perturbed, to_noisy


class ANPState:
    """The noisy copy of a model and the two optimizers of the official script."""

    def __init__(self, model: nn.Module, *, eps: float = 0.4, steps: int = 1, alpha: float = 0.2, lr: float = 0.2,
                 momentum: float = 0.9, clamp_noise: bool = True, mask_layers: Iterable[str] = DEFAULT_KINDS):
        neuron_layers(model, mask_layers)  # a clear error before the copy
        self.model = copy.deepcopy(model)
        self.layers: dict[str, NoisyLayer] = to_noisy(self.model, mask_layers)
        self.eps, self.steps, self.alpha, self.clamp_noise = eps, steps, alpha, clamp_noise
        self.mask_params = [layer.neuron_mask for layer in self.layers.values()]
        self.noise_params = [p for layer in self.layers.values() for p in (layer.neuron_noise, layer.neuron_noise_bias)]
        self.mask_optimizer = torch.optim.SGD(self.mask_params, lr=lr, momentum=momentum)
        self.noise_optimizer = torch.optim.SGD(self.noise_params, lr=eps / steps)

    def reset_noise(self, generator: torch.Generator) -> None:
        """delta then xi ~ U(-eps, eps): one flat draw of every neuron's delta, then every xi."""
        first = next(iter(self.layers.values())).weight
        sizes = [layer.neuron_mask.numel() for layer in self.layers.values()]
        with torch.no_grad():
            flat = torch.empty(2 * sum(sizes), device=first.device, dtype=first.dtype)
            flat.uniform_(-self.eps, self.eps, generator=generator)
            for attr, half in zip(("neuron_noise", "neuron_noise_bias"), flat.chunk(2)):
                for layer, part in zip(self.layers.values(), half.split(sizes)):
                    getattr(layer, attr).copy_(part)

    def iteration(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> float:
        """One ANP iteration on one batch; returns the mask loss."""
        anp_mode(self.model)
        self.reset_noise(generator)
        for _ in range(self.steps):
            self.noise_optimizer.zero_grad()
            set_perturbed(self.layers, True)
            loss_noise = -F.cross_entropy(self.model(images), labels)
            loss_noise.backward()
            for p in self.noise_params:
                if p.grad is not None:
                    p.grad = p.grad.sign()
            self.noise_optimizer.step()
            if self.clamp_noise:
                with torch.no_grad():
                    for p in self.noise_params:
                        p.clamp_(-self.eps, self.eps)
        self.mask_optimizer.zero_grad()
        set_perturbed(self.layers, True)
        loss_rob = F.cross_entropy(self.model(images), labels)
        set_perturbed(self.layers, False)
        loss_nat = F.cross_entropy(self.model(images), labels)
        loss = self.alpha * loss_nat + (1 - self.alpha) * loss_rob
        loss.backward()
        self.mask_optimizer.step()
        with torch.no_grad():
            for m in self.mask_params:
                m.clamp_(0.0, 1.0)
        return loss.item()

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks by layer name: copies on the CPU, float32 (float64 for a float64 model)."""
        keep = lambda t: t if t.dtype == torch.float64 else t.float()  # noqa: E731
        return {name: keep(layer.neuron_mask.detach().cpu()).clone() for name, layer in self.layers.items()}


def anp(model: nn.Module, data: Any, *, eps: float = 0.4, steps: int = 1, alpha: float = 0.2, lr: float = 0.2,
        momentum: float = 0.9, iterations: int = 2000, batch_size: int = 128, clamp_noise: bool = True,
        augment: bool = True, padding: int = 4, flip: bool = True, seed: int = 0, progress: bool = True,
        mask_layers: Iterable[str] = DEFAULT_KINDS) -> ANPResult:
    """Learn ANP masks for ``model`` on the defender's clean ``data`` (anything
    :func:`fastpurify.data.as_tensors` reads). ``model`` is not modified; prune it afterwards
    with :func:`fastpurify.pruning.prune` or :func:`fastpurify.pruning.prune_by_clean_accuracy`.
    ``mask_layers``: which layers hold the neurons (:mod:`fastpurify.neurons`; default BatchNorm,
    LayerNorm and GroupNorm, ``("conv_linear",)`` for the paper's Eq. 3)."""
    check_anp_settings(eps=eps, steps=steps, alpha=alpha, lr=lr, momentum=momentum, iterations=iterations,
                       batch_size=batch_size)
    mask_layers = check_kinds(mask_layers)
    neuron_layers(model, mask_layers)
    device = model_device(model)
    dtype = model_dtype(model)
    images, labels = as_tensors(data, dtype=dtype)
    settings = dict(eps=eps, steps=steps, alpha=alpha, lr=lr, momentum=momentum, iterations=iterations,
                    batch_size=batch_size, clamp_noise=clamp_noise, augment=augment, padding=padding, flip=flip,
                    seed=seed, num_images=int(images.shape[0]), mask_layers=list(mask_layers))
    sampler = DeviceBatchSampler(images, labels, batch_size, seed=seed, augment=augment, padding=padding, flip=flip,
                                 device=device)
    state = ANPState(model, eps=eps, steps=steps, alpha=alpha, lr=lr, momentum=momentum, clamp_noise=clamp_noise,
                     mask_layers=mask_layers)
    noise_generator = make_generator(seed + 1, device)
    steps_iter = range(iterations)
    if progress:
        from tqdm.auto import tqdm
        steps_iter = tqdm(steps_iter, desc="ANP (reference)", unit="it")
    losses = []
    start = time.perf_counter()
    for _ in steps_iter:
        x, y = sampler.sample()
        losses.append(state.iteration(x, y, noise_generator))
    return ANPResult(state.masks(), losses, time.perf_counter() - start, settings)
