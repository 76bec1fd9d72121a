"""Where the kernels can run: compiled on CUDA, or on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported for the interpreter to be
used; this module reads it without importing triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os

SM_COUNT_WITHOUT_GPU = 132  # an H100's (and an H200's): plans made on CPU, meta or the interpreter


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package is installed (it is not on every platform). Looked up once per
    process: the search of sys.path costs ~0.2 ms, and the dispatch asks at every norm layer's
    call (3 ms of a 65 ms ANP iteration of the small CNN on the CPU, before it was cached)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def accumulator_dtype(dtype):
    """Reductions run in float32, or float64 for float64 inputs (used by gradcheck)."""
    import torch
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (a torch.device): read once per CUDA device;
    ``SM_COUNT_WITHOUT_GPU`` for any other device (launch plans made without a GPU)."""
    if device.type != "cuda":
        return SM_COUNT_WITHOUT_GPU
    import torch

    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
