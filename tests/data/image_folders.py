"""Small image folders and archives in torchvision's ImageFolder layout, written for the tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TAR_MODES = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.xz": "w:xz"}


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def image_set(classes=("dog", "cat", "ant"), per_class=(3, 2), size=(4, 5), channels=3, fmt="PNG", seed=0):
    """``{relative path: file bytes}`` and ``{relative path: pixels (H, W[, C])}`` for train and
    test, ``per_class`` images per class in each; file names are not in creation order."""
    rng = np.random.default_rng(seed)
    files, pixels = {}, {}
    suffix = ".png" if fmt == "PNG" else ".jpg"
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            for i in range(n):
                shape = size if channels == 1 else (*size, channels)
                px = rng.integers(0, 256, shape, dtype=np.uint8)
                rel = f"{split}/{c}/{n - i:03d}{suffix}"  # written in reverse name order
                files[rel], pixels[rel] = encode(px, fmt), px
    return files, pixels


def write_folder(root: Path, files: dict[str, bytes], folders=()) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel in folders:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return root


def write_archive(path: Path, files: dict[str, bytes], folders=(), top: str | None = None) -> Path:
    """A tar archive (its compression from the suffix) of the files, under ``top/`` if given."""
    suffix = next(s for s in TAR_MODES if path.name.endswith(s))
    with tarfile.open(path, TAR_MODES[suffix]) as tar:
        for rel in folders:
            info = tarfile.TarInfo(f"{top}/{rel}" if top else rel)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{top}/{rel}" if top else rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
