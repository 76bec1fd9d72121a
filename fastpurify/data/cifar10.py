"""CIFAR-10 from the standard python-pickle batches already on disk (never downloaded).

The batches are pickles, and a pickle can run code. They are read with an unpickler that
accepts only what the real files hold (dicts, lists, bytes and numpy arrays) and refuses any
other global, so a tampered file fails instead of executing.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..validation import InputError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CIFAR10_FILES = TRAIN_FILES + TEST_FILES
FOLDER = "cifar-10-batches-py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists and bytes"
        )


def _batch_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for folder in (root / FOLDER, root):
        if all((folder / f).is_file() for f in CIFAR10_FILES):
            return folder
    missing = [f for f in CIFAR10_FILES if not (root / FOLDER / f).is_file() and not (root / f).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 python batches not found under {root}: expected {root / FOLDER}/"
        f"{{{', '.join(CIFAR10_FILES)}}} (the extracted 'CIFAR-10 python version' archive); "
        f"missing: {', '.join(missing)}. fastpurify never downloads data at run time."
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise InputError(f"{path} is not a CIFAR-10 python batch: {err}") from None
    if not isinstance(batch, dict):
        raise InputError(f"{path} is not a CIFAR-10 python batch: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise InputError(f"{path} is not a CIFAR-10 python batch: it lacks the 'data' and 'labels' entries")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise InputError(
            f"{path} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels; "
            "a CIFAR-10 batch holds uint8 rows of 3072 values and one label per row"
        )
    return data, labels


def load_cifar10(root: str | Path, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the training (50,000) or test (10,000) split as float (N, 3, 32, 32) in [0, 1] and labels."""
    folder = _batch_folder(root)
    parts = [_read_batch(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise InputError(f"CIFAR-10 labels must lie in [0, 9], found [{labels.min()}, {labels.max()}]")
    images = torch.from_numpy(data).float().div_(255.0)
    return images, torch.from_numpy(labels)
