"""Triton kernels of fastpurify, installed as the subpackage ``fastpurify.kernels``.

Only ``@triton.jit`` functions and their launch wrappers live here: no autograd and no
``nn.Module`` (those are in ``fastpurify.functional`` and ``fastpurify.layers``).
"""

from .runtime import interpreting, triton_available

__all__ = ["interpreting", "triton_available"]
