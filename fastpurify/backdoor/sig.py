"""SIG (Barni et al. 2019): a horizontal sinusoid added to the image; a clean-label attack.

x'[c, i, j] = x[c, i, j] + delta * sin(2 pi j f / W): the signal varies along the columns.
Only target-class training images are poisoned and their labels are kept.
"""

from __future__ import annotations

import math

import torch

from ..validation import check_positive
from .base import Attack


class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, *, delta: float = 20 / 255, frequency: float = 6, **kwargs):
        super().__init__(**kwargs)
        check_positive(delta, "delta")
        check_positive(frequency, "frequency")
        self.delta, self.frequency = delta, frequency

    def signal(self, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """The signal along one row: (W,)."""
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.frequency / width)).to(dtype=dtype, device=device)

    def _add_trigger(self, images: torch.Tensor) -> torch.Tensor:
        return images + self.signal(images.shape[-1], images.dtype, images.device)
