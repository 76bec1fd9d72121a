"""Backdoor attacks (test subjects for the defenses), poisoning and metrics.

Every attack has the same interface, ``apply(images, labels) -> images, labels``, works on any
image size and channel count, and is seeded. Images are (N, C, H, W) with pixels in [0, 1].
"""

from __future__ import annotations

from .badnets import BadNets
from .base import MODES, Attack
from .blend import Blend
from .metrics import (accuracy, attack_success_rate, backdoor_metrics, evaluate, implant_warning, robust_accuracy,
                      weak_attack_warning)
from .poison import PoisonedDataset, poison
from .subject import BackdoorSubject, train_backdoored
from .sig import SIG
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "blend": Blend, "sig": SIG, "wanet": WaNet}


def make_attack(name: str, **kwargs) -> Attack:
    """An attack by name: one of ``badnets``, ``blend``, ``sig``, ``wanet``."""
    from ..validation import InputError

    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}: choose one of {sorted(ATTACKS)}")
    return ATTACKS[name](**kwargs)


__all__ = [
    "ATTACKS", "MODES", "Attack", "BackdoorSubject", "BadNets", "Blend", "PoisonedDataset", "SIG", "WaNet", "accuracy",
    "attack_success_rate", "backdoor_metrics", "evaluate", "make_attack", "poison", "robust_accuracy", "train_backdoored",
]
