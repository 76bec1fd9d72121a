"""Reference untargeted PGD with torchattacks semantics (``PGD`` for L-inf, ``PGDL2`` for L2).

The model runs in eval mode (every submodule's own flag is restored afterwards) and only the
gradient of the mean cross-entropy with respect to the input is computed, so the model's
parameters never receive ``.grad``. Per step:

- L-inf: ``x <- x + alpha * sign(g)``; ``delta = clamp(x - x0, -eps, eps)``; ``x = clamp(x0 + delta, lo, hi)``;
  random start ``x0 + U(-eps, eps)`` clamped to [lo, hi].
- L2: ``x <- x + alpha * g / (||g||_2 + 1e-10)`` per image; ``delta`` scaled by
  ``min(1, eps / ||delta||_2)``; ``x = clamp(x0 + delta, lo, hi)``; random start: a Gaussian
  direction scaled to a radius ``U(0, 1) * eps``, clamped to [lo, hi].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import make_generator
from ..inference import eval_mode, model_device
from ..validation import InputError, check_images, check_labels, check_pgd_settings, check_positive_int


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 10, random_start: bool = True, norm: str = "linf", lo: float = 0.0,
        hi: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
        batch_size: int | None = None) -> torch.Tensor:
    """Adversarial examples of ``images`` (pixels in [lo, hi]) that raise the model's loss on
    ``labels``, returned detached on the images' device. The random start (one draw for all
    images) comes from ``generator``, else from a generator seeded with ``seed``, else from
    torch's global RNG. ``batch_size``: attack the images in chunks of this many (default: all
    at once); in eval mode each image's result does not depend on the chunking."""
    check_pgd_settings(eps=eps, alpha=alpha, steps=steps, norm=norm, lo=lo, hi=hi, random_start=random_start)
    check_images(images)
    check_labels(labels, num_images=images.shape[0])
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if float(images.min()) < lo or float(images.max()) > hi:
        raise InputError(f"images must lie in the pixel range [{lo}, {hi}], found "
                         f"[{float(images.min()):.4g}, {float(images.max()):.4g}]")
    if seed is not None and generator is not None:
        raise InputError("give a seed or a generator for the random start, not both")
    device = model_device(model)
    x0 = images.detach().to(device)
    y = labels.to(device)
    if generator is None and seed is not None:
        generator = make_generator(seed, device)
    adv = x0.clone()
    if random_start:
        if norm == "linf":
            adv = adv + torch.empty_like(adv).uniform_(-eps, eps, generator=generator)
        else:
            delta = torch.empty_like(adv).normal_(generator=generator)
            radius = torch.empty_like(_per_image_norm(delta)).uniform_(0, 1, generator=generator)
            adv = adv + delta * radius / _per_image_norm(delta) * eps
        adv = adv.clamp(lo, hi)
    size = batch_size or x0.shape[0]
    chunks = []
    with eval_mode(model), torch.enable_grad():
        for s in range(0, x0.shape[0], size):
            chunks.append(_attack(model, x0[s:s + size], adv[s:s + size], y[s:s + size], eps=eps, alpha=alpha,
                                  steps=steps, norm=norm, lo=lo, hi=hi))
    return torch.cat(chunks).to(images.device)


def _attack(model: nn.Module, x0: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
            steps: int, norm: str, lo: float, hi: float) -> torch.Tensor:
    """``steps`` PGD steps from ``adv`` around ``x0`` (the model already in eval mode)."""
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach()
        if norm == "linf":
            adv = adv + alpha * grad.sign()
            delta = (adv - x0).clamp(-eps, eps)
        else:
            adv = adv + alpha * grad / (_per_image_norm(grad) + 1e-10)
            delta = adv - x0
            delta = delta * torch.clamp(eps / _per_image_norm(delta), max=1.0)
        adv = (x0 + delta).clamp(lo, hi)
    return adv.detach()
