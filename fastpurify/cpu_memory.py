"""Keep freed memory in the process on Linux (glibc), so eager CPU steps stop page-faulting.

Every eager PyTorch step on the CPU allocates its activations and frees them again. glibc serves
each block above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and unmaps it
on free, and trims the heap's top above its trim threshold, so the next step faults every page in
again and the kernel zeroes it. Measured on this project's 2-core CPU (bench/NOTES.md,
2026-11-27): ~9,000 minor page faults per PGD step of the small CNN at batch 128, up to two
thirds of the process's time in the kernel, and the same steps 1.2-1.7x faster once freed blocks
are kept for reuse (ANP and PGD alike; the fast engines gain most, their steps being shorter).

:func:`keep_freed_memory` raises both thresholds with ``mallopt``. It is process-wide and lasts
for the rest of the process (glibc has no way back to its dynamic thresholds): the process keeps
up to its peak heap instead of returning freed blocks to the system. The ``fastpurify`` command
line calls it (opt out with ``FASTPURIFY_KEEP_FREED_MEMORY=0``); the Python API never does on its
own — call it yourself for long CPU runs. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20  # blocks below 256 MiB come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # the heap's top goes back to the system only above 1 GiB free
OPT_OUT = "FASTPURIFY_KEEP_FREED_MEMORY"

_kept: dict | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).
    Returns whether they are raised now: False off glibc or if ``mallopt`` refused."""
    global _kept
    if _kept is not None:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    _kept = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return True


def keep_freed_memory_unless_opted_out() -> bool:
    """:func:`keep_freed_memory` unless ``FASTPURIFY_KEEP_FREED_MEMORY`` is ``0`` (the command line's default)."""
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return keep_freed_memory()


def malloc_state() -> dict:
    """What a benchmark records: whether freed memory is kept, and the thresholds if so."""
    return {"keep_freed_memory": _kept is not None, **(_kept or {})}
