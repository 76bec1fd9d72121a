"""Blend: the image mixed with a fixed random pattern, x' = (1 - alpha) x + alpha p."""

from __future__ import annotations

import torch

from ..validation import InputError, check_fraction
from .base import Attack


class Blend(Attack):
    name = "blend"

    def __init__(self, *, alpha: float = 0.2, pattern: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        check_fraction(alpha, "alpha", high_open=False)
        if pattern is not None and (pattern.dim() != 3 or not pattern.is_floating_point()):
            raise InputError(f"a Blend pattern must be a float tensor (C, H, W), got shape {tuple(pattern.shape)}")
        self.alpha, self._pattern = alpha, pattern

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The blend pattern for this image shape: the given one, or uniform noise from the seed."""
        if self._pattern is not None:
            if tuple(self._pattern.shape) != (channels, height, width):
                raise InputError(f"the Blend pattern has shape {tuple(self._pattern.shape)} but the images "
                                 f"are ({channels}, {height}, {width})")
            return self._pattern
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(channels, height, width, generator=g)

    def _add_trigger(self, images: torch.Tensor) -> torch.Tensor:
        p = self.pattern(*images.shape[1:]).to(images.device, images.dtype)
        return (1.0 - self.alpha) * images + self.alpha * p
