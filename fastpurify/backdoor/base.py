"""The interface every attack shares, and the label maps (all-to-one, all-to-all)."""

from __future__ import annotations

import torch

from ..validation import InputError, check_images, check_labels, check_num_classes, check_target

MODES = ("all2one", "all2all")


class Attack:
    """A backdoor attack: a trigger on images and a map from true to attacker labels.

    ``mode="all2one"`` sends every triggered image to ``target``; ``"all2all"`` sends class y
    to (y + 1) mod C. A clean-label attack (SIG) poisons only target-class training images and
    keeps their labels. Images are (N, C, H, W) with pixels in [0, 1]; all randomness (trigger
    patterns, noise) comes from ``seed``.
    """

    name = "attack"
    clean_label = False
    min_size = 1  # smallest height/width the trigger fits in

    def __init__(self, *, num_classes: int, target: int = 0, mode: str = "all2one", seed: int = 0):
        check_num_classes(num_classes)
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if self.clean_label and mode != "all2one":
            raise InputError(f"{self.name} is a clean-label attack: only mode='all2one' is possible")
        check_target(target, num_classes)
        self.num_classes, self.target, self.mode, self.seed = num_classes, target, mode, seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, target={self.target}, mode={self.mode!r})"

    # --- what subclasses implement -------------------------------------------------------
    def _add_trigger(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- the shared interface ------------------------------------------------------------
    def trigger(self, images: torch.Tensor) -> torch.Tensor:
        """A triggered copy of ``images`` (the input is not modified)."""
        check_images(images, unit_range=True)
        h, w = images.shape[-2:]
        if min(h, w) < self.min_size:
            raise InputError(f"{self.name} needs images of at least {self.min_size}x{self.min_size}, got {h}x{w}")
        return self._add_trigger(images).clamp(0.0, 1.0)

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels the backdoor makes the model output on triggered images."""
        check_labels(labels, num_classes=self.num_classes)
        if self.mode == "all2all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.target)

    def poison_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels stored with poisoned training images (unchanged for clean-label attacks)."""
        return labels.clone() if self.clean_label else self.target_labels(labels)

    def apply(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triggered images and their poisoned labels."""
        check_labels(labels, num_images=images.shape[0], num_classes=self.num_classes)
        return self.trigger(images), self.poison_labels(labels)

    def poison_candidates(self, labels: torch.Tensor) -> torch.Tensor:
        """Which training images may be poisoned: target-class ones for clean-label attacks,
        non-target ones for all-to-one, every image for all-to-all."""
        if self.clean_label:
            return labels == self.target
        if self.mode == "all2one":
            return labels != self.target
        return torch.ones_like(labels, dtype=torch.bool)

    def asr_eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Which test images count for the attack success rate: for all-to-one, images whose
        true label is the target are excluded (as in the ANP paper)."""
        if self.mode == "all2one":
            return labels != self.target
        return torch.ones_like(labels, dtype=torch.bool)
