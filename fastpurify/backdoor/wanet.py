"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warp of the image.

A k x k field of random offsets (from the seed, normalised to mean absolute value 1) is
upsampled bicubically to the image size and added, scaled by ``strength``/size, to the identity
sampling grid. In noise mode (training only) a random per-pixel jitter of at most one pixel is
added on top and the true label is kept, which stops the model from learning any warp at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import InputError, check_images, check_positive
from .base import Attack


class WaNet(Attack):
    name = "wanet"
    min_size = 2

    def __init__(self, *, grid_size: int = 4, strength: float = 0.5, cross_ratio: float = 2.0,
                 grid_rescale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(grid_size, int) or grid_size < 2:
            raise InputError(f"grid_size must be an integer >= 2, got {grid_size!r}")
        check_positive(strength, "strength")
        check_positive(grid_rescale, "grid_rescale")
        if not cross_ratio >= 0:
            raise InputError(f"cross_ratio must be >= 0, got {cross_ratio!r}")
        self.grid_size, self.strength = grid_size, strength
        self.cross_ratio, self.grid_rescale = cross_ratio, grid_rescale
        g = torch.Generator().manual_seed(self.seed)
        field = torch.rand(1, 2, grid_size, grid_size, generator=g) * 2 - 1
        self.field = field / field.abs().mean()

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The warped sampling grid (1, H, W, 2) in grid_sample's (x, y) order, within [-1, 1]."""
        noise = F.interpolate(self.field, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1)  # (1, H, W, 2): channel 0 moves x, channel 1 moves y
        ys = torch.linspace(-1, 1, height)
        xs = torch.linspace(-1, 1, width)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((xx, yy), dim=-1)[None]
        scale = torch.tensor([self.strength / width, self.strength / height])
        return ((identity + noise * scale) * self.grid_rescale).clamp(-1, 1)

    def _warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(images.device, images.dtype).expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _add_trigger(self, images: torch.Tensor) -> torch.Tensor:
        return self._warp(images, self.grid(*images.shape[-2:]))

    def noise(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-mode images: the warp plus a random jitter of up to one pixel (labels kept)."""
        check_images(images, unit_range=True)
        n, _, h, w = images.shape
        jitter = torch.rand(n, h, w, 2, generator=generator) * 2 - 1
        jitter = jitter * torch.tensor([1.0 / w, 1.0 / h])
        grid = (self.grid(h, w) + jitter).clamp(-1, 1)
        return self._warp(images, grid).clamp(0.0, 1.0)
