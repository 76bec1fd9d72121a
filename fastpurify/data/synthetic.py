"""A seeded synthetic image-classification set for shape and throughput tests.

Each class has its own smooth random template; an image is its class template plus noise, so
the set is learnable, of any size, and the same for the same seed on every machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import check_num_classes, check_positive_int


def synthetic_dataset(n: int = 512, num_classes: int = 10, channels: int = 3, size: int = 32,
                      noise: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images (n, channels, size, size) in [0, 1] and balanced labels (n,)."""
    check_positive_int(n, "n")
    check_num_classes(num_classes)
    check_positive_int(channels, "channels")
    check_positive_int(size, "size")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = templates[labels] + noise * torch.randn(n, channels, size, size, generator=g)
    return images.clamp_(0.0, 1.0), labels
