"""PGD input updates: the L-infinity signed-gradient step with its projection and the L-infinity
random start (elementwise kernels over the flattened batch), and the L2 normalised-gradient step
with its projection (one program per image: two per-image norms, then the update)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import accumulator_dtype

BLOCK = 1024


@triton.jit
def pgd_linf_step_kernel(X, X0, GRAD, n, alpha, eps, lo, hi, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK),)``; each program updates BLOCK consecutive pixels:
    x <- clamp(x + alpha * sign(grad), max(x0 - eps, lo), min(x0 + eps, hi)), one clamp."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(X + offs, mask=valid, other=0.0).to(ACC)
    x0 = tl.load(X0 + offs, mask=valid, other=0.0).to(ACC)
    g = tl.load(GRAD + offs, mask=valid, other=0.0).to(ACC)
    x = x + alpha * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    low = tl.maximum(x0 - eps, lo)
    high = tl.minimum(x0 + eps, hi)
    x = tl.minimum(tl.maximum(x, low), high)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=valid)


@triton.jit
def pgd_random_start_kernel(X, X0, U, n, eps, lo, hi, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK),)``; each program writes BLOCK pixels of the random start
    x = clamp(x0 + eps * (2u - 1), lo, hi) from uniform draws u in [0, 1)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x0 = tl.load(X0 + offs, mask=valid, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=valid, other=0.0).to(ACC)
    x = tl.minimum(tl.maximum(x0 + eps * (2.0 * u - 1.0), lo), hi)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=valid)


@triton.jit
def _l2_moved(X, X0, GRAD, base, offs, valid, scale, ACC: tl.constexpr):
    """One block of an image: ``x0`` and the moved delta ``x + scale * grad - x0``."""
    x = tl.load(X + base + offs, mask=valid, other=0.0).to(ACC)
    x0 = tl.load(X0 + base + offs, mask=valid, other=0.0).to(ACC)
    g = tl.load(GRAD + base + offs, mask=valid, other=0.0).to(ACC)
    return x0, x + scale * g - x0


@triton.jit
def pgd_l2_step_kernel(X, X0, GRAD, d, alpha, eps, lo, hi, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(N,)``; program i updates image i (``d`` contiguous pixels) in three sweeps:
    ``g_norm = ||grad_i||``; ``x' = x + alpha * grad / (g_norm + 1e-10)`` and ``d_norm = ||x' - x0||``;
    ``x <- clamp(x0 + (x' - x0) * min(1, eps / d_norm), lo, hi)``."""
    base = tl.program_id(0).to(tl.int64) * d
    g_sq = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(GRAD + base + offs, mask=offs < d, other=0.0).to(ACC)
        g_sq += g * g
    scale = alpha / (tl.sqrt(tl.sum(g_sq, axis=0)) + 1e-10)
    d_sq = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        _, delta = _l2_moved(X, X0, GRAD, base, offs, offs < d, scale, ACC)
        d_sq += delta * delta
    factor = tl.minimum(eps / tl.sqrt(tl.sum(d_sq, axis=0)), 1.0)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < d
        x0, delta = _l2_moved(X, X0, GRAD, base, offs, valid, scale, ACC)
        x = tl.minimum(tl.maximum(x0 + delta * factor, lo), hi)
        tl.store(X + base + offs, x.to(X.dtype.element_ty), mask=valid)


def pgd_linf_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float, lo: float,
                  hi: float) -> None:
    n = x.numel()
    if n:
        pgd_linf_step_kernel[(triton.cdiv(n, BLOCK),)](x, x0, grad, n, float(alpha), float(eps), float(lo), float(hi),
                                                       ACC=accumulator_dtype(x.dtype), BLOCK=BLOCK)


def pgd_random_start(x: torch.Tensor, x0: torch.Tensor, u: torch.Tensor, eps: float, lo: float, hi: float) -> None:
    n = x.numel()
    if n:
        pgd_random_start_kernel[(triton.cdiv(n, BLOCK),)](x, x0, u, n, float(eps), float(lo), float(hi),
                                                          ACC=accumulator_dtype(x.dtype), BLOCK=BLOCK)


def pgd_l2_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float, lo: float,
                hi: float) -> None:
    """``x``, ``x0``, ``grad``: contiguous (N, ...) batches, one image per row."""
    n = x.shape[0]
    d = x.numel() // n if n else 0
    if n and d:
        block = min(BLOCK, triton.next_power_of_2(d))
        pgd_l2_step_kernel[(n,)](x, x0, grad, d, float(alpha), float(eps), float(lo), float(hi),
                                 ACC=accumulator_dtype(x.dtype), BLOCK=block)
