"""BadNets: a 3x3 checkerboard patch in the bottom-right corner (the official ANP pattern)."""

from __future__ import annotations

import torch

from .base import Attack

# Rows top to bottom of the official ANP 'checkerboard_1corner' trigger (values / 255).
PATCH = ((0.0, 0.0, 1.0),
         (0.0, 1.0, 0.0),
         (1.0, 0.0, 1.0))


class BadNets(Attack):
    name = "badnets"
    min_size = 3

    def _add_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        out[..., -3:, -3:] = torch.tensor(PATCH, dtype=images.dtype, device=images.device)
        return out
