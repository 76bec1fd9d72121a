"""Backdoored digits models for the end-to-end tests: 16x16 digits split 80/20 (seed 0), a small
BN CNN trained on the poisoned 80 % with the foundation's trainer (lr 0.05, batch 64, crop
padding 2, no flip: digits are not mirror-symmetric)."""

import torch

from fastpurify.backdoor import Attack, BackdoorSubject, train_backdoored
from fastpurify.data import load_digits, train_test_split
from fastpurify.models import small_cnn


def digits_subject(attack: Attack, *, width: int, epochs: int, rate: float = 0.1,
                   ) -> tuple[BackdoorSubject, tuple[torch.Tensor, torch.Tensor]]:
    """(the trained subject, the 20 % test split); torch's seed 0 for the weights."""
    images, labels = load_digits(size=16)
    train, test = train_test_split(images, labels, 0.2, seed=0)
    torch.manual_seed(0)
    subject = train_backdoored(small_cnn(num_classes=10, in_channels=1, width=width), train, test, attack, rate,
                               epochs=epochs, lr=0.05, batch_size=64, padding=2, flip=False, progress=False)
    return subject, test
