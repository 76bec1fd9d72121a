"""Loaded by pytest before any test module, whichever of tests/ and bench/ it collects first."""

import os

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The flag
# must be set before any kernel module (or triton) is imported: fastpurify imports them lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
