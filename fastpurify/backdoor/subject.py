"""Make a test subject: poison a training set, train a model on it, measure ACC / ASR / RA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..training import TrainHistory, train_classifier
from .base import Attack
from .metrics import evaluate
from .poison import PoisonedDataset, poison


@dataclass
class BackdoorSubject:
    model: nn.Module
    attack: Attack
    poisoned: PoisonedDataset
    metrics: dict
    history: TrainHistory


def train_backdoored(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], attack: Attack, rate: float, *,
                     seed: int = 0, **train_kwargs) -> BackdoorSubject:
    """Poison ``train`` with ``attack`` at ``rate``, train ``model`` on it in place
    (keywords as :func:`fastpurify.training.train_classifier`), and evaluate on ``test``."""
    poisoned = poison(train, attack, rate, seed=seed)
    history = train_classifier(model, poisoned.images, poisoned.labels, seed=seed, **train_kwargs)
    metrics = evaluate(model, test[0], test[1], attack)
    return BackdoorSubject(model, attack, poisoned, metrics, history)
