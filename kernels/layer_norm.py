"""Masked-and-perturbed LayerNorm: one fused forward kernel and one fused backward kernel.

The input is seen as ``(N, C, S)`` through three strides (sample, feature, position), as the
BatchNorm kernels see theirs: ``nn.LayerNorm((C,))`` on ``(N, T, C)`` is S = T positions with
feature stride 1; ConvNeXt's LayerNorm2d on NCHW is S = H*W with feature stride S (1 for
channels_last). Every *row* ``r = n * S + s`` is normalised over its C features. The batch holds
``G`` equal contiguous groups of ``Ng = N / G`` samples; the rows of group g use
``scale = w * (mask + noise[g])`` and ``shift = b * (1 + noise_bias[g])`` (DESIGN.md §1).

Both kernels run on the grid ``(G, cdiv(Ng * S, BLOCK_R))``: a program owns ``BLOCK_R`` rows of
one group and walks their features in ``BLOCK_C`` chunks, so every reduction is a loop inside one
program (deterministic, no atomics). The parameter gradients are summed per program into a
``(G, P, C)`` buffer that the launcher reduces in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import accumulator_dtype, interpreting


@triton.jit
def _row_offsets(rows, Rg, g, S, sn, ss):
    """Offsets (int64) of the first feature of rows ``rows`` (local to group g), and their validity."""
    r = g * Rg + rows
    n = (r // S).to(tl.int64)
    s = (r % S).to(tl.int64)
    return n * sn + s * ss, rows < Rg


@triton.jit
def ln_forward_kernel(X, Y, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD, C, S, Rg, sxn, sxc, sxs, syn, syc, sys_,
                      s_noise, s_noise_b, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr,
                      HAS_NOISE_B: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(G, cdiv(Rg, BLOCK_R))``, Rg = rows per group. Each program takes BLOCK_R rows of
    group ``program_id(0)``: one sweep over the features for the mean, one for the variance
    (centred, in ACC precision), saves mean and 1/sqrt(var + eps) per row to ``MEAN``/``RSTD``,
    and a third sweep writes y = (x - mean) * rstd * w * (mask + noise[g]) + b * (1 + noise_bias[g])."""
    g = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    xrow, rvalid = _row_offsets(rows, Rg, g, S, sxn, sxs)
    yrow, _ = _row_offsets(rows, Rg, g, S, syn, sys_)
    feats = tl.arange(0, BLOCK_C)
    total = tl.zeros((BLOCK_R,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + feats
        valid = rvalid[:, None] & (cs < C)[None, :]
        x = tl.load(X + xrow[:, None] + cs.to(tl.int64)[None, :] * sxc, mask=valid, other=0.0).to(ACC)
        total += tl.sum(x, axis=1)
    mean = total / C
    sq = tl.zeros((BLOCK_R,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + feats
        valid = rvalid[:, None] & (cs < C)[None, :]
        x = tl.load(X + xrow[:, None] + cs.to(tl.int64)[None, :] * sxc, mask=valid, other=0.0).to(ACC)
        d = tl.where(valid, x - mean[:, None], 0.0)
        sq += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    tl.store(MEAN + g * Rg + rows, mean, mask=rvalid)
    tl.store(RSTD + g * Rg + rows, rstd, mask=rvalid)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + feats
        cvalid = cs < C
        valid = rvalid[:, None] & cvalid[None, :]
        scale, shift = _scale_shift(W, B, MASK, NOISE, NOISE_B, g, cs, cvalid, s_noise, s_noise_b, HAS_W, HAS_B,
                                    HAS_NOISE, HAS_NOISE_B, ACC)
        x = tl.load(X + xrow[:, None] + cs.to(tl.int64)[None, :] * sxc, mask=valid, other=0.0).to(ACC)
        y = (x - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
        tl.store(Y + yrow[:, None] + cs.to(tl.int64)[None, :] * syc, y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _scale_shift(W, B, MASK, NOISE, NOISE_B, g, cs, cvalid, s_noise, s_noise_b, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_NOISE_B: tl.constexpr, ACC: tl.constexpr):
    """Group g's scale w * (mask + noise[g]) and shift b * (1 + noise_bias[g]) of features ``cs``."""
    m = tl.load(MASK + cs, mask=cvalid, other=0.0).to(ACC)
    if HAS_NOISE:
        m += tl.load(NOISE + g * s_noise + cs, mask=cvalid, other=0.0).to(ACC)
    if HAS_W:
        m *= tl.load(W + cs, mask=cvalid, other=0.0).to(ACC)
    shift = tl.zeros_like(m)
    if HAS_B:
        shift = tl.load(B + cs, mask=cvalid, other=0.0).to(ACC)
        if HAS_NOISE_B:
            shift *= 1.0 + tl.load(NOISE_B + g * s_noise_b + cs, mask=cvalid, other=0.0).to(ACC)
    return m, shift


@triton.jit
def ln_backward_kernel(X, DY, DX, W, MASK, NOISE, MEAN, RSTD, PART_A, PART_B, C, S, Rg, P, sxn, sxc, sxs, sdn,
                       sdc, sds, s_noise, HAS_W: tl.constexpr, HAS_NOISE: tl.constexpr, NEED_DX: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(G, cdiv(Rg, BLOCK_R))``. Each program takes BLOCK_R rows of group g: one sweep
    sums, per row, dyh = dy * scale_g and dyh * xhat over the features; a second writes
    dx = rstd * (dyh - mean(dyh) - xhat * mean(dyh * xhat)) (dx is laid out as x) and adds, per
    feature, its rows' sums of dy * xhat and dy into ``PART_A``/``PART_B`` (G, P, C) at its own
    program slot (P = programs per group)."""
    g = tl.program_id(0)
    pid = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    xrow, rvalid = _row_offsets(rows, Rg, g, S, sxn, sxs)
    drow, _ = _row_offsets(rows, Rg, g, S, sdn, sds)
    mean = tl.load(MEAN + g * Rg + rows, mask=rvalid, other=0.0)
    rstd = tl.load(RSTD + g * Rg + rows, mask=rvalid, other=0.0)
    feats = tl.arange(0, BLOCK_C)
    c1 = tl.zeros((BLOCK_R,), dtype=ACC)
    c2 = tl.zeros((BLOCK_R,), dtype=ACC)
    if NEED_DX:
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + feats
            cvalid = cs < C
            valid = rvalid[:, None] & cvalid[None, :]
            scale, _ = _scale_shift(W, W, MASK, NOISE, NOISE, g, cs, cvalid, s_noise, s_noise, HAS_W, False,
                                    HAS_NOISE, False, ACC)
            x = tl.load(X + xrow[:, None] + cs.to(tl.int64)[None, :] * sxc, mask=valid, other=0.0).to(ACC)
            dy = tl.load(DY + drow[:, None] + cs.to(tl.int64)[None, :] * sdc, mask=valid, other=0.0).to(ACC)
            xhat = (x - mean[:, None]) * rstd[:, None]
            dyh = dy * scale[None, :]
            c1 += tl.sum(tl.where(valid, dyh * xhat, 0.0), axis=1)
            c2 += tl.sum(dyh, axis=1)
    c1 = c1 / C
    c2 = c2 / C
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + feats
        cvalid = cs < C
        valid = rvalid[:, None] & cvalid[None, :]
        x = tl.load(X + xrow[:, None] + cs.to(tl.int64)[None, :] * sxc, mask=valid, other=0.0).to(ACC)
        dy = tl.load(DY + drow[:, None] + cs.to(tl.int64)[None, :] * sdc, mask=valid, other=0.0).to(ACC)
        xhat = tl.where(valid, (x - mean[:, None]) * rstd[:, None], 0.0)
        slot = (g * P + pid).to(tl.int64) * C + cs
        tl.store(PART_A + slot, tl.sum(dy * xhat, axis=0), mask=cvalid)
        tl.store(PART_B + slot, tl.sum(dy, axis=0), mask=cvalid)
        if NEED_DX:
            scale, _ = _scale_shift(W, W, MASK, NOISE, NOISE, g, cs, cvalid, s_noise, s_noise, HAS_W, False,
                                    HAS_NOISE, False, ACC)
            dx = rstd[:, None] * (dy * scale[None, :] - c2[:, None] - xhat * c1[:, None])
            tl.store(DX + xrow[:, None] + cs.to(tl.int64)[None, :] * sxc, dx.to(DX.dtype.element_ty), mask=valid)


def tile_shape(rows_per_group: int, c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): up to 256 features per sweep, about 4096 values per tile (fewer,
    larger programs under the interpreter)."""
    block_c = min(triton.next_power_of_2(c), 256)
    budget = 16384 if interpreting() else 4096
    block_r = max(1, min(triton.next_power_of_2(rows_per_group), budget // block_c))
    return block_r, block_c


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.dim() > 0 and t.shape[0] > 1 else 0


def ln_forward(x3: torch.Tensor, y3: torch.Tensor, weight, bias, mask, noise, noise_bias, mean: torch.Tensor,
               rstd: torch.Tensor, *, groups: int, eps: float) -> None:
    """Launch the forward on ``x3`` (N, C, S) into ``y3`` (same shape, any strides); ``mean``
    and ``rstd`` (N * S,) receive each row's statistics. ``weight``/``bias`` (C,) or None,
    ``mask`` (C,), ``noise``/``noise_bias`` (G, C) with unit feature stride, or None."""
    n, c, s = x3.shape
    rows = (n // groups) * s
    block_r, block_c = tile_shape(rows, c)
    grid = (groups, triton.cdiv(rows, block_r))
    ln_forward_kernel[grid](
        x3, y3, weight if weight is not None else mask, bias if bias is not None else mask, mask,
        noise if noise is not None else mask, noise_bias if noise_bias is not None else mask, mean, rstd,
        c, s, rows, *x3.stride(), *y3.stride(),
        _row_stride(noise) if noise is not None else 0, _row_stride(noise_bias) if noise_bias is not None else 0, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, ACC=accumulator_dtype(x3.dtype), BLOCK_R=block_r, BLOCK_C=block_c)


def ln_backward(x3: torch.Tensor, dy3: torch.Tensor, dx3: torch.Tensor | None, weight, mask, noise,
                mean: torch.Tensor, rstd: torch.Tensor, *, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: writes ``dx3`` (laid out as ``x3``) when given, and returns the
    per-group feature sums ``A = sum(dy * xhat)`` and ``B = sum(dy)``, each (G, C) in the
    accumulation precision, reduced over the programs in a fixed order."""
    n, c, s = x3.shape
    rows = (n // groups) * s
    block_r, block_c = tile_shape(rows, c)
    programs = triton.cdiv(rows, block_r)
    acc = torch.float64 if x3.dtype == torch.float64 else torch.float32
    part_a = torch.empty(groups, programs, c, dtype=acc, device=x3.device)
    part_b = torch.empty_like(part_a)
    ln_backward_kernel[(groups, programs)](
        x3, dy3, dx3 if dx3 is not None else x3, weight if weight is not None else mask, mask,
        noise if noise is not None else mask, mean, rstd, part_a, part_b, c, s, rows, programs,
        *x3.stride(), *dy3.stride(), _row_stride(noise) if noise is not None else 0,
        HAS_W=weight is not None, HAS_NOISE=noise is not None, NEED_DX=dx3 is not None,
        ACC=accumulator_dtype(x3.dtype), BLOCK_R=block_r, BLOCK_C=block_c)
    return part_a.sum(1), part_b.sum(1)
