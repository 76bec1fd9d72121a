"""A trigger reconstructed toward a class, as Neural Cleanse reconstructs triggers: one small mask
and one pattern shared by every image. The ``auto`` pruning rule's patch probe and its scan
(:mod:`fastpurify.selection`) and the trigger-guided order (:mod:`fastpurify.patch_order`) use it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH_LR = 0.1  # Adam on the mask's and the pattern's logits
PATCH_AREA_WEIGHT = 50.0  # the penalty on the soft mask's area above the budget


def reconstruct_patch(model: nn.Module, images: torch.Tensor, target: int, *, area: float, steps: int,
                      batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A trigger toward ``target`` for the (frozen, eval-mode) ``model``: a mask (1, 1, H, W) of
    exactly ``round(area * H * W)`` ones (at least one) and a pattern (1, C, H, W) in [0, 1].

    ``steps`` Adam steps (lr ``PATCH_LR``) over all ``images`` (gradients summed over chunks of
    ``batch_size``) on the logits of a soft mask and the pattern, minimising the cross-entropy of
    ``(1 - m) x + m p`` to ``target`` plus ``PATCH_AREA_WEIGHT`` times the soft mask's mean above
    ``area``; the mask kept is the soft mask's ``area`` largest pixels. Images are in [0, 1]."""
    n, c, h, w = images.shape
    device = images.device
    g = torch.Generator().manual_seed(seed)
    mask_logit = (torch.randn(1, 1, h, w, generator=g) * 0.1 - 3.0).to(device).requires_grad_(True)
    pattern_logit = (torch.randn(1, c, h, w, generator=g) * 0.1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=PATCH_LR)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size]
                m, p = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
                logits = model((1 - m) * x + m * p)
                goal = torch.full((x.shape[0],), target, device=device)
                loss = F.cross_entropy(logits.float(), goal, reduction="sum") / n
                if start == 0:
                    loss = loss + PATCH_AREA_WEIGHT * F.relu(m.mean() - area)
                loss.backward()
            optimizer.step()
    with torch.no_grad():
        chosen = torch.sigmoid(mask_logit).flatten().topk(max(1, round(area * h * w))).indices
        mask = torch.zeros(h * w, device=device)
        mask[chosen] = 1.0
        return mask.view(1, 1, h, w), torch.sigmoid(pattern_logit).detach()
