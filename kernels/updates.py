"""In-place updates of flat parameter buffers: one launch covers every neuron of a network.

ANP keeps all masks, noises and the momentum buffer in flat arenas (DESIGN.md §4), so each
update is one elementwise kernel over the whole arena instead of a few ops per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import accumulator_dtype

BLOCK = 1024


@triton.jit
def _sign(g):
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def noise_sign_step_kernel(NOISE, GRAD, n, step_size, eps, CLAMP: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK),)``; each program updates BLOCK consecutive entries:
    noise <- noise + step_size * sign(grad), then clamped to [-eps, eps] if CLAMP."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    noise = tl.load(NOISE + offs, mask=valid, other=0.0).to(ACC)
    grad = tl.load(GRAD + offs, mask=valid, other=0.0).to(ACC)
    noise = noise + step_size * _sign(grad)
    if CLAMP:
        noise = tl.minimum(tl.maximum(noise, -eps), eps)
    tl.store(NOISE + offs, noise.to(NOISE.dtype.element_ty), mask=valid)


@triton.jit
def mask_sgd_step_kernel(MASK, GRAD, BUF, n, lr, momentum, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK),)``; each program updates BLOCK consecutive entries with torch's
    SGD momentum rule, buf <- momentum * buf + grad; mask <- mask - lr * buf, then clamps the
    mask to [0, 1]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    mask = tl.load(MASK + offs, mask=valid, other=0.0).to(ACC)
    grad = tl.load(GRAD + offs, mask=valid, other=0.0).to(ACC)
    buf = momentum * tl.load(BUF + offs, mask=valid, other=0.0).to(ACC) + grad
    mask = tl.minimum(tl.maximum(mask - lr * buf, 0.0), 1.0)
    tl.store(BUF + offs, buf.to(BUF.dtype.element_ty), mask=valid)
    tl.store(MASK + offs, mask.to(MASK.dtype.element_ty), mask=valid)


def noise_sign_step(noise: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float, clamp: bool) -> None:
    n = noise.numel()
    if n:
        noise_sign_step_kernel[(triton.cdiv(n, BLOCK),)](noise, grad, n, float(step_size), float(eps), CLAMP=clamp,
                                                         ACC=accumulator_dtype(noise.dtype), BLOCK=BLOCK)


def mask_sgd_step(mask: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float) -> None:
    n = mask.numel()
    if n:
        mask_sgd_step_kernel[(triton.cdiv(n, BLOCK),)](mask, grad, buf, n, float(lr), float(momentum),
                                                       ACC=accumulator_dtype(mask.dtype), BLOCK=BLOCK)
