"""The decoded images of an image folder, kept as one uint8 safetensors file so that a second load
reads them back instead of decoding again.

The file is named after the source's absolute path (and the format version) and records the
source's fingerprint: for an archive its size and modification time, for a folder the number,
total size and latest modification time of its files and folders. A file whose fingerprint or
format differs is stale and rebuilt; one that cannot be read (truncated, not safetensors, wrong
contents) is rebuilt with a warning. Files are written atomically, so a run killed while writing
leaves no half file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..files import atomic_path

FORMAT = "1"  # bump when the decoding or the file's contents change
KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_folder(cache: bool | str | Path) -> Path | None:
    """Where the cache files go: the folder given, else $FASTPURIFY_CACHE, else
    $XDG_CACHE_HOME/fastpurify or ~/.cache/fastpurify; None for ``cache=False``."""
    if cache is False:
        return None
    if cache is not True:
        return Path(cache).expanduser()
    if os.environ.get("FASTPURIFY_CACHE"):
        return Path(os.environ["FASTPURIFY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastpurify"


def fingerprint(source: Path) -> dict:
    """What changes when the source does (see the module's docstring)."""
    stat = source.stat()
    if not source.is_dir():
        return {"path": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    files, size, latest = 0, 0, stat.st_mtime_ns
    for folder, dirs, names in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs:
            latest = max(latest, os.stat(os.path.join(folder, name)).st_mtime_ns)
        for name in names:
            if not name.startswith("."):
                st = os.stat(os.path.join(folder, name))
                latest = max(latest, st.st_mtime_ns)
                files, size = files + 1, size + st.st_size
    return {"path": str(source), "files": files, "size": size, "mtime_ns": latest}


def cache_path(folder: Path, source: Path) -> Path:
    digest = hashlib.sha256(f"{source}\0{FORMAT}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:60] or "images"
    return folder / f"{stem}-{digest}.safetensors"


def read_cache(path: Path, expected: dict) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """The cached tensors and classes, or None when there is no valid file for this fingerprint."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT or json.loads(meta.get("fingerprint", "null")) != expected:
                return None  # stale: the source or the format changed
            tensors = {k: fh.get_tensor(k) for k in KEYS}
        classes = json.loads(meta["classes"])
        _check(tensors, classes)
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt, whatever the error
        warnings.warn(f"the image cache {path} is unreadable ({type(err).__name__}: {str(err)[:200]}); decoding "
                      "the images again and rewriting it", RuntimeWarning, stacklevel=3)
        return None
    return tensors, classes


def _check(tensors: dict[str, torch.Tensor], classes: list) -> None:
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError("its class list is not a list of names")
    shapes = set()
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"its {split} tensors have the wrong type or rank")
        if len(images) != len(labels) or not len(labels) or int(labels.min()) < 0 or \
                int(labels.max()) >= len(classes):
            raise ValueError(f"its {split} labels do not fit its images and classes")
        shapes.add(tuple(images.shape[1:]))
    if len(shapes) != 1:
        raise ValueError("its train and test images differ in shape")


def write_cache(path: Path, tensors: dict[str, torch.Tensor], classes: list[str], expected: dict) -> None:
    """Write the cache file atomically; a failure (read-only or full disk) is a warning only."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "fingerprint": json.dumps(expected), "classes": json.dumps(classes)}
    try:
        with atomic_path(path) as tmp:
            save_file({k: tensors[k].contiguous() for k in KEYS}, str(tmp), metadata=meta)
    except OSError as err:
        warnings.warn(f"could not write the image cache {path} ({err}); the next load decodes the images again",
                      RuntimeWarning, stacklevel=3)
