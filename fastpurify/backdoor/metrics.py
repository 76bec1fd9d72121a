"""Clean accuracy (ACC), attack success rate (ASR) and robust accuracy (RA), as fractions."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..inference import predict
from ..validation import InputError, check_images, check_labels
from .base import Attack


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of images classified as their label."""
    check_images(images)
    check_labels(labels, num_images=images.shape[0])
    return float((predict(model, images, batch_size) == labels).float().mean())


IMPLANTED_ASR = 0.8  # below this a subject's backdoor counts as not implanted (the papers' subjects: ~100 %)


def _weak(asr: float | None) -> bool:
    """An ASR measured (not a clean model's None) and under ``IMPLANTED_ASR``."""
    return asr is not None and asr < IMPLANTED_ASR


def implant_warning(asr: float | None) -> str | None:
    """What to tell the user about a backdoored subject whose ASR (a fraction) stays under
    ``IMPLANTED_ASR``: a defense's "ASR after" says little where the trigger barely worked before.
    None where it implanted (or for a clean model, ASR None)."""
    if not _weak(asr):
        return None
    return (f"the backdoor did not implant (ASR {asr:.1%} < {IMPLANTED_ASR:.0%}): what a defense leaves of it says "
            "little; train longer (--epochs), on more images (--train-images) or at a higher --rate")


def weak_attack_warning(asr: float | None) -> str | None:
    """The same bar for a user's model evaluated with the attack the user named: where that attack
    hardly works before the defense, the ASR after says little, and the attack given (its kind,
    target, trigger options) is the likelier mistake. None where it works (or ASR None)."""
    if not _weak(asr):
        return None
    return (f"the attack given reaches only ASR {asr:.1%} (< {IMPLANTED_ASR:.0%}) on the model before the defense: "
            "the ASR after says little; check that --attack and its options (--target, --mode, ...) describe the "
            "backdoor the model carries")


def backdoor_metrics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack,
                     batch_size: int = 512) -> dict[str, float]:
    """ASR and RA on the triggered test images that count (all-to-one excludes the target class).

    ASR: fraction classified as the attacker's label. RA: fraction still classified as their
    true label.
    """
    check_images(images, unit_range=True)
    check_labels(labels, num_images=images.shape[0], num_classes=attack.num_classes)
    keep = attack.asr_eligible(labels)
    if not bool(keep.any()):
        raise InputError("no test image counts for the attack success rate: all of them belong to the target class")
    x, y = images[keep], labels[keep]
    pred = predict(model, attack.trigger(x), batch_size)
    return {
        "asr": float((pred == attack.target_labels(y)).float().mean()),
        "ra": float((pred == y).float().mean()),
        "n_asr": int(keep.sum()),
    }


def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack,
                        batch_size: int = 512) -> float:
    return backdoor_metrics(model, images, labels, attack, batch_size)["asr"]


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack,
                    batch_size: int = 512) -> float:
    return backdoor_metrics(model, images, labels, attack, batch_size)["ra"]


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack | None = None,
             batch_size: int = 512) -> dict[str, float]:
    """ACC on the clean test set, plus ASR and RA when an attack is given."""
    report = {"acc": accuracy(model, images, labels, batch_size), "n_test": int(images.shape[0])}
    if attack is not None:
        report.update(backdoor_metrics(model, images, labels, attack, batch_size))
    return report
