"""The embedded default dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grayscale scans (UCI optical digits, 10 classes) that ship inside scikit-learn,
so no network is needed. Upscaled (bilinear) to ``size`` and optionally repeated to 3 channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import InputError


def load_digits(size: int = 16, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images (1797, channels, size, size) in [0, 1] and labels (1797,) in [0, 9]."""
    if not isinstance(size, int) or size < 8:
        raise InputError(f"digits size must be an integer >= 8 (the scans are 8x8), got {size!r}")
    if channels not in (1, 3):
        raise InputError(f"digits channels must be 1 or 3, got {channels!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return images.contiguous(), torch.as_tensor(bunch.target, dtype=torch.int64)
