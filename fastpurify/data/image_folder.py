"""Images in torchvision's ImageFolder layout, from a folder or a tar archive of one (``.tar``,
``.tar.gz``/``.tgz``, ``.tar.xz``/``.txz``, ``.tar.bz2``)::

    train/<class>/<image>.jpg|.jpeg|.png
    test/<class>/<image>.jpg|.jpeg|.png

directly at the top, or under one top-level folder (``cifar10-jpeg/train/...``). Classes are the
class folders' names, sorted (torchvision's order); train and test must hold the same classes,
each class folder at least one image, and images are taken in file-name order.

What is accepted: hidden entries (a name starting with ".", e.g. ``.DS_Store``) are ignored
everywhere, and so is whatever lies beside ``train/`` and ``test/`` (a README, a ``val/``
folder). Inside ``train/`` and ``test/`` anything else is an error naming it: a file beside the
class folders, a folder or a non-image file inside a class folder. Every image must decode (JPEG
or PNG only) and all must share one size. Images become RGB, except that a set whose every
image is grayscale stays one channel (see :mod:`fastpurify.data.image_decode`).

The decoded images are cached as uint8 (:mod:`fastpurify.data.image_cache`), written only once
everything has been read and checked, so the second load reads one file instead of decoding.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..validation import InputError
from .image_cache import cache_folder, cache_path, fingerprint, read_cache, write_cache
from .image_decode import decode_all, default_workers, stack_images
from .image_listing import Listing, list_source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
LAYOUT = "train/<class>/<image> and test/<class>/<image> (.jpg, .jpeg or .png), at the top or under one folder"


@dataclass(frozen=True)
class ImageFolderData:
    """The train and test splits of an image folder and its class names (label i is classes[i])."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[str, ...]
    source: Path

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_image_folder(path: str | Path, *, cache: bool | str | Path = True, workers: int | None = None,
                      progress: bool | None = None, dtype: torch.dtype = torch.float32) -> ImageFolderData:
    """Read the train and test splits of an image folder or archive (the layout above).

    Images are (N, C, H, W) in [0, 1] as ``dtype`` (the package's convention), or the raw
    pixels for ``dtype=torch.uint8`` (a quarter of the memory); labels are int64.
    ``cache``: True (``$FASTPURIFY_CACHE``, else ``$XDG_CACHE_HOME/fastpurify`` or
    ``~/.cache/fastpurify``), a folder, or False (decode every time, write nothing).
    ``workers``: decoding threads (default: the CPUs, at most 8; 0 or 1 decode here).
    ``progress``: a bar while reading and decoding (default: when stderr is a terminal).
    """
    source = Path(path).expanduser().resolve()
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise InputError(f"workers must be an integer >= 0, got {workers!r}")
    if not isinstance(dtype, torch.dtype) or not (dtype == torch.uint8 or dtype.is_floating_point):
        raise InputError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    if not source.exists():
        raise FileNotFoundError(f"image folder or archive not found: {source}")
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    folder = cache_folder(cache)
    file = cache_path(folder, source) if folder is not None else None
    stamp = fingerprint(source) if file is not None else {}  # taken before reading: a change meanwhile rebuilds
    cached = read_cache(file, stamp) if file is not None else None
    if cached is None:
        tensors, classes = _decode(source, default_workers() if workers is None else workers, progress)
        if file is not None:
            write_cache(file, tensors, classes, stamp)
    else:
        tensors, classes = cached

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = tensors[f"{name}_images"]
        if dtype != torch.uint8:
            images = images.to(dtype).div_(255.0)
        return images, tensors[f"{name}_labels"]

    return ImageFolderData(split("train"), split("test"), tuple(classes), source)


def _decode(source: Path, workers: int, progress: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    listing = list_source(source, progress)
    classes, files = find_layout(listing)
    names = [rel for split in SPLITS for _, rels in files[split] for rel in rels]
    payloads = [listing.files[rel] for rel in names]
    listing.files.clear()  # the archive's bytes: each is held once, in payloads, until decoded
    decoded = decode_all(payloads, workers=workers, progress=progress, desc=f"decoding {source.name}")
    del payloads
    pixels = torch.from_numpy(stack_images(decoded, names, listing.where))  # (N, H, W, C)
    del decoded
    tensors, start = {}, 0
    for split in SPLITS:
        labels = [label for label, (_, rels) in enumerate(files[split]) for _ in rels]
        tensors[f"{split}_images"] = pixels[start:start + len(labels)].permute(0, 3, 1, 2).clone(
            memory_format=torch.contiguous_format)  # a copy of its own, also where C = 1
        tensors[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
        start += len(labels)
    return tensors, classes


def _root(listing: Listing) -> str:
    """The folder that holds train/ and test/: the top (""), or the one top-level folder that does."""
    def has_splits(base: str) -> bool:
        return all(f"{base}/{s}".lstrip("/") in listing.folders for s in SPLITS)

    if has_splits(""):
        return ""
    tops = sorted({p.split("/", 1)[0] for p in [*listing.files, *listing.folders, *listing.others]})
    candidates = [t for t in tops if t in listing.folders and has_splits(t)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise InputError(f"{listing.source} holds several image folders ({', '.join(candidates)}): expected one, "
                         f"laid out as {LAYOUT}")
    found = (", ".join(tops[:10]) + (" ..." if len(tops) > 10 else "")) if tops else "nothing"
    raise InputError(f"{listing.source} does not hold the expected layout {LAYOUT}; its top holds: {found}")


def _entries(listing: Listing, root: str) -> dict[str, list[tuple[str, list[str], str]]]:
    """Per split, every entry below it: (relative path, its parts below the split, kind), sorted."""
    entries = [(p, "folder") for p in listing.folders] + [(p, "file") for p in listing.files] + \
              [(p, "other") for p in listing.others]
    prefixes = {split: f"{root}/{split}/".lstrip("/") for split in SPLITS}
    out: dict[str, list] = {split: [] for split in SPLITS}
    for rel, kind in sorted(entries):
        for split, prefix in prefixes.items():
            if rel.startswith(prefix):
                out[split].append((rel, rel[len(prefix):].split("/"), kind))
    return out


def _classes_of(listing: Listing, split: str, base: str, entries: list) -> dict[str, list[str]]:
    """The class folders of one split and their images; anything else there is an error."""
    classes: dict[str, list[str]] = {}
    for rel, inner, kind in entries:
        where = listing.where(rel)
        if len(inner) == 1:
            if kind != "folder":
                raise InputError(f"{where} lies directly in {split}/: expected only class folders there "
                                 f"({split}/<class>/<image>)")
            classes.setdefault(inner[0], [])
        elif len(inner) == 2 and kind == "folder":
            raise InputError(f"{where} is a folder inside a class folder: expected only images in {split}/<class>/ "
                             "(no sub-folders)")
        elif len(inner) == 2 and kind == "file" and rel.lower().endswith(IMAGE_SUFFIXES):
            classes.setdefault(inner[0], []).append(rel)
        elif len(inner) == 2:
            raise InputError(f"{where} is not a .jpg, .jpeg or .png image: a class folder may hold only images "
                             "(hidden files such as .DS_Store are ignored)")
    if not classes:
        raise InputError(f"{listing.where(base)} holds no class folders: expected {LAYOUT}")
    for name, rels in classes.items():
        if not rels:
            raise InputError(f"{listing.where(f'{base}/{name}')} is empty: every class folder needs at least one "
                             "image")
    return classes


def find_layout(listing: Listing) -> tuple[list[str], dict[str, list[tuple[str, list[str]]]]]:
    """The sorted class names, and per split the image files of each class (sorted by name)."""
    root = _root(listing)
    entries = _entries(listing, root)
    per_split = {split: _classes_of(listing, split, f"{root}/{split}".lstrip("/"), entries[split])
                 for split in SPLITS}
    train, test = set(per_split["train"]), set(per_split["test"])
    if train != test:
        only = [f"only in {s}: {', '.join(sorted(a - b)[:10])}" for s, a, b in (("train", train, test),
                                                                                ("test", test, train)) if a - b]
        raise InputError(f"{listing.source}: train/ and test/ must hold the same class folders; {'; '.join(only)}")
    classes = sorted(train)
    return classes, {s: [(c, per_split[s][c]) for c in classes] for s in SPLITS}
