"""Stage ``cifar``: the fidelity run on real data, CIFAR-10 (JPEG copy) — a backdoored model trained
on the GPU, then fast ANP and PBE, ACC / ASR before and after, with times.

It needs the tarball inside the checkout (``--cifar PATH``; only the checkout travels to a GPU
machine), the image-folder loader of the CIFAR-10 issue (``fastpurify.data.load_image_folder``,
there now) and the fidelity run itself (``fastpurify reproduce``, a later item of that issue).
Until all are there the stage is skipped with the reason; nothing else fails.
"""

from __future__ import annotations

from pathlib import Path

LOADER = "load_image_folder"


def unavailable(cifar: str | None) -> str | None:
    """Why the stage cannot run, or None."""
    if not cifar:
        return "no --cifar tarball given (copy ../shared/data/cifar10-jpeg.tar.xz into an ignored folder of the " \
               "checkout and pass --cifar PATH)"
    if not Path(cifar).is_file():
        return f"--cifar {cifar}: no such file"
    import fastpurify.data as data

    if not hasattr(data, LOADER):
        return (f"fastpurify.data.{LOADER} does not exist yet: the image-folder loader is the CIFAR-10 issue's "
                "first item and has not landed")
    return NOT_WRITTEN  # until the run below exists; then: return None


NOT_WRITTEN = "the fidelity run (fastpurify reproduce) is not written yet"


def run(record, opts) -> None:
    record.finish("skipped", unavailable(opts.cifar) or NOT_WRITTEN)
