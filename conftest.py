"""Loaded by pytest before any test module, whichever of tests/ and bench/ it collects first."""

import os

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The flag
# must be set before any kernel module (or triton) is imported: fastpurify imports them lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The files holding ``slow`` tests (real training runs, minutes each) first, each file kept
    whole and in order: under ``make test``'s pytest-xdist (``--dist loadfile
    --no-loadscope-reorder``, which hands files out in this order) they then start while the other
    worker runs the rest, instead of ending the run on one worker alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each file kept
