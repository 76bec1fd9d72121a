"""Atomic output: a file appears whole under its final name, or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``
    (atomic on POSIX), on failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def damage(path: str | Path) -> str | None:
    """Why a file that failed to load looks damaged (truncated, overwritten, another format),
    or None where it looks whole, so that its loader's own refusal is the better message.
    Knows safetensors (a little-endian header length, then a JSON header), zip archives (``.npz``
    and ``torch.save``'s format) and pickles (the legacy ``torch.save`` format)."""
    import struct
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(9)
    if path.suffix.lower() == ".safetensors":
        n = struct.unpack("<Q", head[:8])[0] if size >= 8 else size
        if 8 + n > size or head[8:9] != b"{":
            return "not a safetensors file, or a truncated one (its header does not fit in the file)"
        with path.open("rb") as fh:
            fh.seek(8)
            try:
                header = json.loads(fh.read(n))
                end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError):
                return "not a safetensors file (its header is not the JSON of a safetensors file)"
        if 8 + n + end != size:
            return f"a truncated or damaged safetensors file (its header describes {8 + n + end} bytes, it has {size})"
        return None
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"a truncated or damaged zip archive ({err})"
        return f"a damaged zip archive (member {bad} fails its CRC check)" if bad else None
    if head[:1] == b"\x80" and path.suffix.lower() != ".npz":
        return None  # a pickle: its loader says whether it holds code
    return "neither a zip archive (numpy's .npz, torch.save's format) nor a pickle"
