"""Named data sources for the command line: ``digits``, ``synthetic``, ``cifar10[:DIR]``, a
CIFAR-10 folder path, ``imagefolder:PATH`` (an image folder or a tar archive of one),
``cifar10-jpeg[:PATH]`` (the CIFAR-10 (JPEG copy) tarball), or a file of images and labels.
Each gives a train and a test split and the class count; a file is a test split only (the
defender's own images, no training split)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..validation import InputError
from .cifar10 import CLASSES, load_cifar10
from .digits import load_digits
from .image_folder import load_image_folder
from .split import train_test_split
from .synthetic import synthetic_dataset
from .tensor_file import SUFFIXES, load_tensor_file

SOURCES = ("digits", "synthetic", "cifar10[:DIR]", "DIR (CIFAR-10 python batches)",
           "imagefolder:PATH (train/<class>/*.jpg|png and test/..., a folder or .tar/.tar.gz/.tar.xz)",
           "cifar10-jpeg[:PATH] (cifar10-jpeg.tar.xz)", f"FILE ({'/'.join(SUFFIXES)} with images and labels)")
CIFAR10_JPEG = "cifar10-jpeg.tar.xz"
CIFAR10_JPEG_NAME = "CIFAR-10 (JPEG copy)"


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
                test_fraction: float = 0.2, progress: bool | None = None) -> DataSplits:
    """Load a named source. Digits and synthetic data are split by a seeded permutation;
    CIFAR-10 keeps its own test batch, an image folder its test/ folder. CIFAR-10's folder
    defaults to $FASTPURIFY_DATA or ./data; for the JPEG copy see :func:`find_cifar10_jpeg`.
    ``progress``: a bar while an image folder is decoded (default: on a terminal)."""
    if spec == "cifar10-jpeg" or spec.startswith(("cifar10-jpeg:", "imagefolder:")):
        return _image_folder_source(spec, size, channels, progress)
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


def find_cifar10_jpeg() -> Path:
    """``cifar10-jpeg.tar.xz`` in $FASTPURIFY_DATA, ./data or ../shared/data (from the current folder)."""
    places = [Path(os.environ["FASTPURIFY_DATA"])] if os.environ.get("FASTPURIFY_DATA") else []
    places += [Path("data"), Path("..") / "shared" / "data"]
    for place in places:
        if (place / CIFAR10_JPEG).is_file():
            return place / CIFAR10_JPEG
    looked = ", ".join(str((p / CIFAR10_JPEG).resolve()) for p in places)
    raise FileNotFoundError(f"{CIFAR10_JPEG} not found; looked for {looked}. Set FASTPURIFY_DATA to its folder "
                            "or give its path: --data cifar10-jpeg:PATH")


def _image_folder_source(spec: str, size: int | None, channels: int | None, progress: bool | None) -> DataSplits:
    kind, _, path = spec.partition(":")
    if kind == "cifar10-jpeg" and (size not in (None, 32) or channels not in (None, 3)):
        raise InputError("CIFAR-10 images are 3x32x32: do not set a different size or channel count")
    if not path and kind == "imagefolder":
        raise InputError("imagefolder needs a path: --data imagefolder:PATH (a folder or a .tar/.tar.gz/.tar.xz)")
    data = load_image_folder(path or find_cifar10_jpeg(), progress=progress)
    shape = tuple(data.train[0].shape[1:])
    if kind == "cifar10-jpeg":
        if data.classes != CLASSES or shape != (3, 32, 32):
            raise InputError(f"{data.source} is not the CIFAR-10 (JPEG copy): it holds {len(data.classes)} classes "
                             f"({', '.join(data.classes[:10])}) of {shape} images, not CIFAR-10's ten classes of "
                             "(3, 32, 32)")
        return DataSplits(data.train, data.test, 10, CIFAR10_JPEG_NAME)
    if size not in (None, shape[-1]) or channels not in (None, shape[0]):
        raise InputError(f"{data.source} holds {shape} images, not the {channels or '?'} channels of "
                         f"{size or '?'} pixels asked for; image folders are not resized")
    return DataSplits(data.train, data.test, data.num_classes, data.source.name)
