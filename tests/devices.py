"""The device the kernel, functional and layer tests put their tensors on.

``FASTPURIFY_TEST_DEVICE`` (``cpu``, the default, ``cuda`` or ``cuda:N``) picks it. On CPU the
Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest.py
without a GPU). The GPU check runs the same suites with ``FASTPURIFY_TEST_DEVICE=cuda`` so that
every test there feeds CUDA tensors to fastpurify and the ``triton`` backend means the compiled
kernels; tests/conftest.py refuses to start if CUDA is asked for but absent (or TRITON_INTERPRET is
set), and turns TF32 off. The GPU check's command:

    FASTPURIFY_TEST_DEVICE=cuda python -m pytest tests/kernels tests/test_functional_batch_norm.py \
        tests/test_functional_layer_norm.py tests/test_functional_group_norm.py tests/test_functional_updates.py \
        tests/test_layers.py tests/test_layers_norms.py tests/test_eval_norms.py

Tests that only make sense on the CPU carry :data:`cpu_only`.

Random values are drawn on the CPU with seeded ``torch.Generator``s and then moved with
:func:`on_device`, so that every device sees the same numbers.
"""

import os
import re

import pytest
import torch

ACCEPTED = "'cpu', 'cuda' or 'cuda:N'"


def _parse(value: str) -> torch.device:
    value = value.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"FASTPURIFY_TEST_DEVICE must be {ACCEPTED}, got {value!r}")
    return torch.device(value)


TEST_DEVICE = _parse(os.environ.get("FASTPURIFY_TEST_DEVICE", "cpu") or "cpu")

# Compiled Triton passes Python-float hyperparameters (eps, momentum, step sizes) as float32
# kernel arguments (fastpurify/functional.py), so a float64 result of the compiled kernels
# carries their float32 rounding, relative ~1e-8; the interpreter keeps them float64.
COMPILED_FLOAT64_TOL = 1e-8


def float64_tol(backend: str, exact: float = 1e-12) -> float:
    """The float64 tolerance of a kernel result: ``exact`` unless the kernels run compiled."""
    return COMPILED_FLOAT64_TOL if backend == "triton" and TEST_DEVICE.type == "cuda" else exact

cpu_only = pytest.mark.skipif(
    TEST_DEVICE.type != "cpu",
    reason="checks the CPU set-up (Triton's interpreter, or an ahead-of-time GPU compile without a GPU); "
           "meaningless with FASTPURIFY_TEST_DEVICE=cuda")


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on TEST_DEVICE (the same tensor when it is there already). A dense layout, channels_last
    included, is kept; a strided view arrives contiguous, so move before slicing."""
    return t.to(TEST_DEVICE)


def to_device(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`on_device` of each tensor."""
    return tuple(on_device(t) for t in ts)


def device_generator(seed: int) -> torch.Generator:
    """A seeded generator on TEST_DEVICE, for fastpurify functions that draw on their input's
    device (the numbers then differ between devices; compare them only with draws of the same
    device)."""
    return torch.Generator(device=TEST_DEVICE).manual_seed(seed)
