"""Poison a training set with an attack, recording which images were changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import as_tensors
from ..validation import InputError, check_fraction
from .base import Attack


@dataclass
class PoisonedDataset:
    """A poisoned copy of a training set.

    ``poison_indices`` were triggered (and relabelled unless the attack is clean-label);
    ``cross_indices`` are WaNet noise-mode images (warped with jitter, labels kept).
    """

    images: torch.Tensor
    labels: torch.Tensor
    clean_labels: torch.Tensor
    poison_indices: torch.Tensor
    attack: Attack
    cross_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def is_poisoned(self) -> torch.Tensor:
        """Boolean (N,): ground truth of which images carry the trigger."""
        mask = torch.zeros(len(self), dtype=torch.bool, device=self.images.device)
        mask[self.poison_indices.to(mask.device)] = True
        return mask

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels


def poison(data: Any, attack: Attack, rate: float, *, seed: int = 0) -> PoisonedDataset:
    """Trigger ``round(rate * N)`` training images chosen at random (seeded) among the attack's
    candidates (non-target images for all-to-one, target-class images for clean-label attacks,
    any image for all-to-all). The given data is never modified."""
    check_fraction(rate, "poison rate")
    images, labels = as_tensors(data, num_classes=attack.num_classes)
    n = images.shape[0]
    count = round(rate * n)
    if count == 0:
        raise InputError(f"poison rate {rate} of {n} images poisons no image; raise the rate or give more data")
    candidates = torch.nonzero(attack.poison_candidates(labels)).flatten()
    if candidates.numel() < count:
        kind = "target-class" if attack.clean_label else "eligible"
        raise InputError(f"poison rate {rate} asks for {count} poisoned images but only {candidates.numel()} "
                         f"{kind} images exist for {attack!r}; lower the rate")
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:count]].sort().values
    out_images, out_labels = images.clone(), labels.clone()
    out_images[chosen], out_labels[chosen] = attack.apply(images[chosen], labels[chosen])
    cross = torch.empty(0, dtype=torch.int64)
    n_cross = min(round(getattr(attack, "cross_ratio", 0.0) * count), n - count)
    if n_cross > 0:
        rest = torch.ones(n, dtype=torch.bool)
        rest[chosen] = False
        rest_idx = torch.nonzero(rest).flatten()
        cross = rest_idx[torch.randperm(rest_idx.numel(), generator=g)[:n_cross]].sort().values
        out_images[cross] = attack.noise(images[cross], generator=g)
    return PoisonedDataset(out_images, out_labels, labels, chosen, attack, cross)
