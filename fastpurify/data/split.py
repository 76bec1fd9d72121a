"""Seeded train/test split of tensor data."""

from __future__ import annotations

import torch

from ..validation import check_fraction


def train_test_split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Split by a seeded permutation: ``((train_x, train_y), (test_x, test_y))``."""
    check_fraction(test_fraction, "test_fraction")
    n = images.shape[0]
    n_test = max(1, round(n * test_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(images.device)
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])
