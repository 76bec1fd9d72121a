"""What an image folder or a tar archive of one holds: its files (with their bytes, or their path
on disk) and its folders, by relative POSIX path. Hidden entries (a name starting with ".",
such as ``.DS_Store`` or macOS's ``._*`` files) are left out, with everything under them.

An archive is read in one pass (random access into a compressed tar would decompress it again
for every member), so a listing of an archive holds every file's bytes.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import InputError

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


@dataclass
class Listing:
    source: Path
    is_archive: bool
    files: dict[str, bytes | str] = field(default_factory=dict)  # relative path -> bytes, or path on disk
    folders: set[str] = field(default_factory=set)
    others: list[str] = field(default_factory=list)  # links, devices: neither a file nor a folder

    def where(self, rel: str) -> str:
        """How an error names an entry: the path on disk, or the member and its archive."""
        return f"{rel} in {self.source}" if self.is_archive else str(self.source / rel)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVES)




def list_folder(root: Path) -> Listing:
    listing = Listing(root, False)
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder).relative_to(root)
        for d in dirs:
            listing.folders.add((base / d).as_posix())
        for f in files:
            if f.startswith("."):
                continue
            full = Path(folder) / f
            rel = (base / f).as_posix()
            if full.is_file():
                listing.files[rel] = str(full)
            else:
                listing.others.append(rel)
    return listing


def _member_path(name: str) -> str | None:
    """A member's normalised relative path; None for the archive's root and hidden entries."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") for p in parts):
        return None
    return "/".join(parts)


def list_archive(path: Path, progress: bool) -> Listing:
    from tqdm.auto import tqdm

    listing = Listing(path, True)
    try:
        with tarfile.open(path, "r:*") as tar, tqdm(desc=f"reading {path.name}", unit=" files",
                                                   disable=not progress) as bar:
            for member in tar:
                rel = _member_path(member.name)
                if rel is None:
                    continue
                if member.isdir():
                    listing.folders.add(rel)
                elif member.isfile():
                    listing.files[rel] = tar.extractfile(member).read()
                    bar.update()
                else:
                    listing.others.append(rel)
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as err:
        raise InputError(f"{path} is not a readable tar archive ({type(err).__name__}: {err})") from None
    for rel in [*listing.files, *listing.folders]:  # the folders implied, where the archive lacks their entries
        parent = rel.rpartition("/")[0]
        while parent and parent not in listing.folders:
            listing.folders.add(parent)
            parent = parent.rpartition("/")[0]
    return listing


def list_source(path: Path, progress: bool) -> Listing:
    if path.is_dir():
        return list_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder or archive not found: {path}")
    if not is_archive(path):
        raise InputError(f"{path} is neither a folder nor a tar archive ({', '.join(ARCHIVES)})")
    return list_archive(path, progress)
