"""Decode many small images (JPEG or PNG) with Pillow, in parallel, into one uint8 array.

Each image is decoded once, to grayscale ("L") or RGB, as raw bytes; the caller's list order
is kept. Images whose modes differ become RGB (a grey image's value in all three channels);
only a set whose every image is grayscale ("1", "L", "LA") stays one channel. Any other mode
("P", "RGBA", "CMYK", ...) becomes RGB as torchvision's ImageFolder loader makes it (alpha is
dropped). All images must have one size: nothing is resized.

Threads, not processes: on the CIFAR-10 (JPEG copy), 60,000 32x32 JPEGs, on a 2-core CPU shared
with other jobs, decoding took 3.5 s in one thread, 3.5 s in two threads and 4.3 s in two
processes. A 32x32 JPEG costs about 55 us, mostly Pillow's Python (header parsing) under the
GIL, and a process pool adds the transfer of every image; threads are never slower than decoding
in place, and on larger images Pillow's decoder runs with the GIL released.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from ..validation import InputError

FORMATS = ("JPEG", "PNG")  # the only decoders Pillow may use: no exotic format on untrusted data
GRAYSCALE = ("1", "L", "LA")
CHUNK = 512  # images per task: big enough that a task's overhead is small

# One decoded image: (mode "L" or "RGB", width, height, raw bytes), or (None, 0, 0, error text).
Decoded = tuple


def decode_image(payload: bytes | str) -> Decoded:
    """Decode the bytes of an image file, or the file at a path; never raises."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload, formats=FORMATS) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in GRAYSCALE else "RGB")
            return im.mode, im.width, im.height, im.tobytes()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None, 0, 0, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _decode_chunk(payloads: Sequence[bytes | str]) -> list[Decoded]:
    return [decode_image(p) for p in payloads]


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _pool(kind: str, workers: int) -> Executor:
    if kind == "process":
        return ProcessPoolExecutor(workers)
    return ThreadPoolExecutor(workers, thread_name_prefix="fastpurify-decode")


def decode_all(payloads: Sequence[bytes | str], *, workers: int, progress: bool, pool: str = "thread",
               desc: str = "decoding") -> list[Decoded]:
    """Decode every payload, in ``workers`` threads or processes (``pool``); 0 or 1: here."""
    chunks = [payloads[i:i + CHUNK] for i in range(0, len(payloads), CHUNK)]
    from tqdm.auto import tqdm

    out: list[Decoded] = []
    with tqdm(total=len(payloads), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            results = map(_decode_chunk, chunks)
            for part in results:
                out.extend(part)
                bar.update(len(part))
            return out
        with _pool(pool, min(workers, len(chunks))) as ex:
            for part in ex.map(_decode_chunk, chunks):
                out.extend(part)
                bar.update(len(part))
    return out


def stack_images(decoded: Sequence[Decoded], names: Sequence[str],
                 where: Callable[[str], str]) -> np.ndarray:
    """One uint8 array (N, H, W, C) of the decoded images; a file that failed to decode or whose
    size differs from the first's is an :class:`InputError` naming it (``where(name)``)."""
    for (mode, _, _, data), name in zip(decoded, names):
        if mode is None:
            raise InputError(f"{where(name)} is not a readable JPEG or PNG image ({data})")
    _, width, height, _ = decoded[0]
    for (_, w, h, _), name in zip(decoded, names):
        if (w, h) != (width, height):
            raise InputError(f"{where(name)} is {w}x{h} pixels but {where(names[0])} is {width}x{height}: every "
                             "image must have one size (resize the images first; nothing is resized here)")
    modes = {d[0] for d in decoded}
    if len(modes) == 1:  # the usual case: one copy of all the bytes
        channels = 1 if modes == {"L"} else 3
        out = np.frombuffer(bytearray().join(d[3] for d in decoded), dtype=np.uint8)  # writable
        out = out.reshape(len(decoded), height, width, channels)
    else:
        channels = 3
        out = np.empty((len(decoded), height, width, channels), dtype=np.uint8)
        for i, (mode, _, _, data) in enumerate(decoded):  # a grey image broadcasts into all three channels
            out[i] = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 1 if mode == "L" else 3)
    return out
