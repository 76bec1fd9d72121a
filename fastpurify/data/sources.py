"""Named data sources for the command line: ``digits``, ``synthetic``, ``cifar10[:DIR]``, a
CIFAR-10 folder path, or a file of images and labels. Each gives a train and a test split and
the class count; a file is a test split only (the defender's own images, no training split)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..validation import InputError
from .cifar10 import load_cifar10
from .digits import load_digits
from .split import train_test_split
from .synthetic import synthetic_dataset
from .tensor_file import SUFFIXES, load_tensor_file

SOURCES = ("digits", "synthetic", "cifar10[:DIR]", "DIR (CIFAR-10 python batches)",
           f"FILE ({'/'.join(SUFFIXES)} with images and labels)")


@dataclass
class DataSplits:
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    name: str

    @property
    def channels(self) -> int:
        return self.train[0].shape[1]


def load_source(spec: str, *, size: int | None = None, channels: int | None = None, seed: int = 0,
                test_fraction: float = 0.2) -> DataSplits:
    """Load a named source. Digits and synthetic data are split by a seeded permutation;
    CIFAR-10 keeps its own test batch. CIFAR-10's folder defaults to $FASTPURIFY_DATA or ./data."""
    if spec == "digits":
        images, labels = load_digits(size=size or 16, channels=channels or 1)
        train, test = train_test_split(images, labels, test_fraction, seed)
        return DataSplits(train, test, 10, "digits")
    if spec == "synthetic":
        images, labels = synthetic_dataset(n=2560, size=size or 32, channels=channels or 3, seed=seed)
        train, test = train_test_split(images, labels, test_fraction, seed)
        return DataSplits(train, test, 10, "synthetic")
    if spec == "cifar10" or spec.startswith("cifar10:") or Path(spec).is_dir():
        if spec == "cifar10":
            root = os.environ.get("FASTPURIFY_DATA", "data")
        else:
            root = spec.split(":", 1)[1] if spec.startswith("cifar10:") else spec
        if size not in (None, 32) or channels not in (None, 3):
            raise InputError("CIFAR-10 images are 3x32x32: do not set a different size or channel count")
        return DataSplits(load_cifar10(root, train=True), load_cifar10(root, train=False), 10, "cifar10")
    if Path(spec).suffix.lower() in SUFFIXES:
        images, labels = load_tensor_file(spec)
        if size not in (None, images.shape[-1]) or channels not in (None, images.shape[1]):
            raise InputError(f"{spec} holds {tuple(images.shape[1:])} images, not the {channels or '?'} channels of "
                             f"{size or '?'} pixels asked for")
        empty = images[:0], labels[:0]
        return DataSplits(empty, (images, labels), int(labels.max()) + 1 if labels.numel() else 0, Path(spec).name)
    raise InputError(f"unknown data source {spec!r}: use one of {', '.join(SOURCES)}")
