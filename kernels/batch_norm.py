"""Masked-and-perturbed BatchNorm as split, deterministic two-stage reductions sized to fill the GPU.

The input is seen as ``(N, C, S)`` through three strides (sample, channel, spatial), which covers
2-D ``(N, C)``, contiguous NCHW and channels_last NHWC without copies. The batch holds ``G`` equal
contiguous groups of ``Ng = N / G`` samples, each normalised with its own statistics over its
``M = Ng * S`` values per channel. Group g uses ``scale = w * (mask + noise[g])`` and
``shift = b * (1 + noise_bias[g])`` (DESIGN.md §1).

**Work split.** A channel block's values in one group are cut into ``splits`` row splits, and
every kernel runs on one 1-D grid of ``G * splits * channel_blocks`` programs, program
``pid = (g * splits + sp) * channel_blocks + cb`` (adjacent programs read adjacent channels).
:func:`launch_plan` picks the tiles and the splits from the shape, the strides and the SM count.

**Tiles** keep the contiguous axis innermost:

- *channels inner* (channels_last, 2-D input, any channel stride 1): tiles ``(BLOCK_R, BLOCK_C)``
  of rows ``r = n * S + s`` (flat inside the group) by channels; a split is a range of rows
  (``Q`` rows, the last one shorter).
- *positions inner* (contiguous NCHW): tiles ``(BLOCK_C, BLOCK_R)`` of channels by spatial
  positions of one sample; a split is a range of ``Q`` samples times a range of ``T`` positions.

Both are one formula: split ``sp`` covers ``[a0, a1) x [b0, b1)`` of a ``U0 x U1`` domain
(rows x 1, or samples x positions), ``a0 = (sp // splits_s) * Q``, ``b0 = (sp % splits_s) * T``,
so every kernel knows each split's exact count ``(a1 - a0) * (b1 - b0)`` without storing it.

**Forward** (training): ``bn_stats_kernel`` reduces each split to its mean and M2, from sums
shifted by the group's first value x0 (as the one-kernel version did over the whole group), and
stores mean - x0 and M2 into a small ``(2, G, splits, C)`` fp32 buffer; ``bn_normalize_kernel``,
on the same grid, merges its group's partials in split order (Chan et al.'s parallel formula,
shifted by split 0's) and normalises its own split's rows. Eval mode runs only
``bn_normalize_kernel`` with the running statistics. **Backward**: ``bn_grad_sums_kernel``
writes per-split sum(dy * xhat) and sum(dy); ``bn_grad_apply_kernel`` merges them and writes dx
for its rows, and one program per channel block writes the per-channel gradients. Every merge is a fixed-order sum over the same partials (no atomics), so results are
bitwise reproducible, and every program of a group computes the same statistics.

**Epilogue.** The output may take a residual tensor r and a ReLU: ReLU(y + r), a ResNet block's
``relu(bn2(conv2(h)) + shortcut)`` in one pass (``fastpurify.fusion``). The backward recomputes
where y + r was positive from x and r (nothing more is saved), zeroes dy elsewhere, and writes
that dy as r's gradient beside dx.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .norm_common import channel_sums, col, index_type, pow2, row_stride, tile_zeros
from .runtime import accumulator_dtype, interpreting, sm_count

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
# Integer arguments that Triton need not specialise (on == 1 or divisibility by 16): they do not
# decide how memory is accessed, and specialising on them would compile a variant per shape.
NOT_SPECIALIZED = ("Ng", "G", "C_BLOCKS", "splits", "U0", "Q", "s_noise", "s_noise_b")


@triton.jit
def _decode(C_BLOCKS, splits):
    """(group, split, channel block) of this program on the ``G * splits * C_BLOCKS`` grid."""
    pid = tl.program_id(0)
    rest = pid // C_BLOCKS
    return rest // splits, rest % splits, pid % C_BLOCKS


@triton.jit
def _split_bounds(sp, U0, U1, Q, T, splits_s):
    """Split(s) ``sp`` (scalar or vector) cover ``[a0, a1) x [b0, b1)`` of the ``U0 x U1`` domain."""
    a0 = (sp // splits_s) * Q
    b0 = (sp % splits_s) * T
    return a0, tl.minimum(a0 + Q, U0), b0, tl.minimum(b0 + T, U1)


@triton.jit
def _tile(u, v, a1, b1, base_n, S, cmask, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
          BLOCK_R: tl.constexpr):
    """Sample ``n`` and position ``s`` (as IDX) of the tile at ``(u, v)`` of a split ending at
    ``(a1, b1)``, and the tile's validity: rows ``u + i`` (channels inner; n and s vectors) or
    positions ``v + i`` of sample ``u`` (positions inner; n a scalar)."""
    i = tl.arange(0, BLOCK_R)
    if CHANNELS_INNER:
        r = u + i
        n = (base_n + r // S).to(IDX)
        s = (r % S).to(IDX)
        valid = (r < a1)[:, None] & cmask[None, :]
    else:
        n = (base_n + u).to(IDX)
        s = v + i
        valid = cmask[:, None] & (s < b1)[None, :]
        s = s.to(IDX)
    return n, s, valid


@triton.jit
def _pivot(X, g, Ng, cs, cmask, sxn, sxc, IDX: tl.constexpr, ACC: tl.constexpr):
    """Group g's first value of each channel ``cs``: the shift of its sums (row 0 of the group in
    either layout)."""
    return tl.load(X + (g * Ng).to(IDX) * sxn + cs.to(IDX) * sxc, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _offsets(n, s, cs, sn, sc, ss, CHANNELS_INNER: tl.constexpr):
    """Memory offsets of a tile of samples ``n``, positions ``s`` and channels ``cs`` (in n's type)."""
    c = cs.to(n.dtype) * sc
    if CHANNELS_INNER:
        return (n * sn + s * ss)[:, None] + c[None, :]
    else:
        return (n * sn + c)[:, None] + (s * ss)[None, :]


@triton.jit
def _channels(cb, C, BLOCK_C: tl.constexpr):
    """Channel indices of block ``cb`` and their validity."""
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return cs, cs < C


@triton.jit
def _group_affine(W, B, MASK, NOISE, NOISE_B, g, cs, cmask, s_noise, s_noise_b, HAS_NOISE: tl.constexpr,
                  HAS_NOISE_B: tl.constexpr, ACC: tl.constexpr):
    """Group g's w, b, mask + noise[g] and 1 + noise_bias[g] of channels ``cs``, in ACC."""
    w = tl.load(W + cs, mask=cmask, other=0.0).to(ACC)
    b = tl.load(B + cs, mask=cmask, other=0.0).to(ACC)
    factor = tl.load(MASK + cs, mask=cmask, other=0.0).to(ACC)
    if HAS_NOISE:
        factor += tl.load(NOISE + g * s_noise + cs, mask=cmask, other=0.0).to(ACC)
    bias_factor = tl.full(cs.shape, 1.0, dtype=ACC)
    if HAS_NOISE_B:
        bias_factor += tl.load(NOISE_B + g * s_noise_b + cs, mask=cmask, other=0.0).to(ACC)
    return w, b, factor, bias_factor


@triton.jit
def _output_affine(rstd, w, factor, b, bias_factor, CHANNELS_INNER: tl.constexpr):
    """(a, shift) of the output y = (x - mean) * a + shift, per channel, as a tile broadcasts them:
    one expression for the forward and for the backward's ReLU mask, which recomputes y from x."""
    return col(rstd * w * factor, CHANNELS_INNER), col(b * bias_factor, CHANNELS_INNER)


@triton.jit
def _pre_activation(x, mean, a, shift, R, offs, valid, RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """The output before a fused ReLU, y = (x - mean) * a + shift (+ the residual tile at ``offs``
    with ``RESIDUAL``): one expression for the forward and for the backward's ReLU mask."""
    y = (x - mean) * a + shift
    if RESIDUAL:
        y += tl.load(R + offs, mask=valid, other=0.0).to(ACC)
    return y


@triton.jit
def _relu_blocks(x, mean, a, shift, R, offs, valid, RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """Where a fused ReLU stops the gradient: y <= 0 for y recomputed as the forward computed it
    (PyTorch's ReLU backward, ``threshold_backward``: a NaN output passes it)."""
    return _pre_activation(x, mean, a, shift, R, offs, valid, RESIDUAL, ACC) <= 0


@triton.jit
def _merge_stats(PART, plane, g, cs, cmask, C, splits, U0, U1, Q, T, splits_s, M, ACC: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean minus the group's pivot x0, and biased variance, of group g's channels ``cs`` from its
    splits' (mean_i - x0, M2_i) in ``PART`` (planes ``plane`` apart): with k = split 0's and
    d_i = (mean_i - x0) - k, mean - x0 = k + sum(n_i d_i) / M and
    M2 = sum(M2_i + n_i d_i^2) - (sum n_i d_i)^2 / M (Chan et al.), summed BLOCK_P splits at a
    time in a fixed order."""
    row = g * splits
    k = tl.load(PART + row * C + cs, mask=cmask, other=0.0).to(ACC)
    acc1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    acc2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        a0, a1, b0, b1 = _split_bounds(p, U0, U1, Q, T, splits_s)
        count = ((a1 - a0) * (b1 - b0)).to(ACC)[:, None]
        valid = (p < splits)[:, None] & cmask[None, :]
        offs = (row + p)[:, None] * C + cs[None, :]
        d = tl.where(valid, tl.load(PART + offs, mask=valid, other=0.0).to(ACC) - k[None, :], 0.0)
        acc1 += count * d
        acc2 += tl.load(PART + plane + offs, mask=valid, other=0.0).to(ACC) + count * d * d
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    return k + s1 / M, tl.maximum(s2 - s1 * s1 / M, 0.0) / M


@triton.jit
def _merge_sums(PART, plane, g, cs, cmask, C, splits, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Group g's sums over its splits of both planes of ``PART``, BLOCK_P splits at a time in a fixed order."""
    row = g * splits
    acc1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    acc2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        valid = (p < splits)[:, None] & cmask[None, :]
        offs = (row + p)[:, None] * C + cs[None, :]
        acc1 += tl.load(PART + offs, mask=valid, other=0.0).to(ACC)
        acc2 += tl.load(PART + plane + offs, mask=valid, other=0.0).to(ACC)
    return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def bn_stats_kernel(X, PART, C, S, Ng, sxn, sxc, sxs, C_BLOCKS, splits, U0, U1, Q, T, splits_s, plane,
                    ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Grid ``(G * splits * C_BLOCKS,)``. Each program reduces its split of its group for its
    BLOCK_C channels, tile by tile, to sums of x - x0 and (x - x0)^2 (x0: the group's first
    value, per channel, as in a one-pass shifted variance; per-lane accumulators in ACC) and
    stores the split's mean - x0 and M2 into ``PART[0, g, sp, :]`` and ``PART[1, g, sp, :]``:
    both small, exact-ish numbers, whatever the mean's magnitude."""
    g, sp, cb = _decode(C_BLOCKS, splits)
    cs, cmask = _channels(cb, C, BLOCK_C)
    base_n = g * Ng
    a0, a1, b0, b1 = _split_bounds(sp, U0, U1, Q, T, splits_s)
    pivot = _pivot(X, g, Ng, cs, cmask, sxn, sxc, IDX, ACC)
    acc1 = tile_zeros(ACC, CHANNELS_INNER, BLOCK_R, BLOCK_C)
    acc2 = tile_zeros(ACC, CHANNELS_INNER, BLOCK_R, BLOCK_C)
    for u in range(a0, a1, BLOCK_R if CHANNELS_INNER else 1):
        for v in range(b0, b1, 1 if CHANNELS_INNER else BLOCK_R):
            n, s, valid = _tile(u, v, a1, b1, base_n, S, cmask, IDX, CHANNELS_INNER, BLOCK_R)
            x = tl.load(X + _offsets(n, s, cs, sxn, sxc, sxs, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            d = tl.where(valid, x - col(pivot, CHANNELS_INNER), 0.0)
            acc1 += d
            acc2 += d * d
    count = (a1 - a0) * (b1 - b0)
    s1 = channel_sums(acc1, CHANNELS_INNER)
    s2 = channel_sums(acc2, CHANNELS_INNER)
    slot = (g * splits + sp) * C + cs
    tl.store(PART + slot, s1 / count, mask=cmask)
    tl.store(PART + plane + slot, tl.maximum(s2 - s1 * s1 / count, 0.0), mask=cmask)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def bn_normalize_kernel(X, Y, R, W, B, MASK, NOISE, NOISE_B, RUN_MEAN, RUN_VAR, MEAN, RSTD, PART,
                        C, S, Ng, G, sxn, sxc, sxs, syn, syc, sys_, srn, src, srs, s_noise, s_noise_b, eps, momentum,
                        C_BLOCKS, splits, U0, U1, Q, T, splits_s, plane,
                        TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_NOISE: tl.constexpr,
                        HAS_NOISE_B: tl.constexpr, RELU: tl.constexpr, RESIDUAL: tl.constexpr, ACC: tl.constexpr,
                        IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid ``(G * splits * C_BLOCKS,)``. Each program takes its group's mean and variance of its
    channels (training: merged from all the group's splits in ``PART``; eval: the running
    statistics), writes y = (x - mean) * rstd * w * (mask + noise[g]) + b * (1 + noise_bias[g])
    (plus the residual r with ``RESIDUAL``; then ReLU(y) with ``RELU``, NaN kept) for the rows of
    its split, and, if it is split 0, saves mean and rstd = 1/sqrt(var + eps) to
    ``MEAN``/``RSTD`` (G, C). The program of group 0, split 0 of each channel block also folds
    every group's statistics into the running ones in group order (unbiased variance) and stores
    them once (``UPDATE_RUNNING``)."""
    g, sp, cb = _decode(C_BLOCKS, splits)
    cs, cmask = _channels(cb, C, BLOCK_C)
    M = Ng * S
    if TRAINING:
        mean, var = _merge_stats(PART, plane, g, cs, cmask, C, splits, U0, U1, Q, T, splits_s, M, ACC, BLOCK_P,
                                 BLOCK_C)
        mean += _pivot(X, g, Ng, cs, cmask, sxn, sxc, IDX, ACC)
        if UPDATE_RUNNING:
            if (g == 0) & (sp == 0):
                run_mean = tl.load(RUN_MEAN + cs, mask=cmask, other=0.0).to(ACC)
                run_var = tl.load(RUN_VAR + cs, mask=cmask, other=0.0).to(ACC)
                for gg in range(0, G):
                    mu, va = _merge_stats(PART, plane, gg, cs, cmask, C, splits, U0, U1, Q, T, splits_s, M, ACC,
                                          BLOCK_P, BLOCK_C)
                    mu += _pivot(X, gg, Ng, cs, cmask, sxn, sxc, IDX, ACC)
                    run_mean = (1.0 - momentum) * run_mean + momentum * mu
                    run_var = (1.0 - momentum) * run_var + momentum * va * M / (M - 1)
                tl.store(RUN_MEAN + cs, run_mean.to(RUN_MEAN.dtype.element_ty), mask=cmask)
                tl.store(RUN_VAR + cs, run_var.to(RUN_VAR.dtype.element_ty), mask=cmask)
    else:
        mean = tl.load(RUN_MEAN + cs, mask=cmask, other=0.0).to(ACC)
        var = tl.load(RUN_VAR + cs, mask=cmask, other=1.0).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    if sp == 0:
        tl.store(MEAN + g * C + cs, mean, mask=cmask)
        tl.store(RSTD + g * C + cs, rstd, mask=cmask)
    w, b, factor, bias_factor = _group_affine(W, B, MASK, NOISE, NOISE_B, g, cs, cmask, s_noise, s_noise_b,
                                              HAS_NOISE, HAS_NOISE_B, ACC)
    a, shift = _output_affine(rstd, w, factor, b, bias_factor, CHANNELS_INNER)
    mean = col(mean, CHANNELS_INNER)
    base_n = g * Ng
    a0, a1, b0, b1 = _split_bounds(sp, U0, U1, Q, T, splits_s)
    for u in range(a0, a1, BLOCK_R if CHANNELS_INNER else 1):
        for v in range(b0, b1, 1 if CHANNELS_INNER else BLOCK_R):
            n, s, valid = _tile(u, v, a1, b1, base_n, S, cmask, IDX, CHANNELS_INNER, BLOCK_R)
            x = tl.load(X + _offsets(n, s, cs, sxn, sxc, sxs, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            y = _pre_activation(x, mean, a, shift, R, _offsets(n, s, cs, srn, src, srs, CHANNELS_INNER), valid,
                                RESIDUAL, ACC)
            if RELU:
                y = tl.where(y < 0, 0.0, y)
            tl.store(Y + _offsets(n, s, cs, syn, syc, sys_, CHANNELS_INNER), y.to(Y.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def bn_grad_sums_kernel(X, DY, R, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD, PART, C, S, Ng, sxn, sxc, sxs, sdn, sdc,
                        sds, srn, src, srs, s_noise, s_noise_b, C_BLOCKS, splits, U0, U1, Q, T, splits_s, plane,
                        HAS_NOISE: tl.constexpr, HAS_NOISE_B: tl.constexpr, RELU: tl.constexpr,
                        RESIDUAL: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(G * splits * C_BLOCKS,)``. Each program reduces its split of its group for its
    channels to sum(dy * xhat) and sum(dy) (xhat recomputed from x and the saved statistics;
    per-lane accumulators in ACC; with ``RELU`` dy is zeroed where the recomputed output, the
    residual r added with ``RESIDUAL``, is <= 0) and stores them into ``PART[0, g, sp, :]`` and
    ``PART[1, g, sp, :]``."""
    g, sp, cb = _decode(C_BLOCKS, splits)
    cs, cmask = _channels(cb, C, BLOCK_C)
    rstd_c = tl.load(RSTD + g * C + cs, mask=cmask, other=0.0).to(ACC)
    mean = col(tl.load(MEAN + g * C + cs, mask=cmask, other=0.0).to(ACC), CHANNELS_INNER)
    rstd = col(rstd_c, CHANNELS_INNER)
    if RELU:
        w, b, factor, bias_factor = _group_affine(W, B, MASK, NOISE, NOISE_B, g, cs, cmask, s_noise, s_noise_b,
                                                  HAS_NOISE, HAS_NOISE_B, ACC)
        a_out, shift = _output_affine(rstd_c, w, factor, b, bias_factor, CHANNELS_INNER)
    base_n = g * Ng
    a0, a1, b0, b1 = _split_bounds(sp, U0, U1, Q, T, splits_s)
    acc_dyx = tile_zeros(ACC, CHANNELS_INNER, BLOCK_R, BLOCK_C)
    acc_dy = tile_zeros(ACC, CHANNELS_INNER, BLOCK_R, BLOCK_C)
    for u in range(a0, a1, BLOCK_R if CHANNELS_INNER else 1):
        for v in range(b0, b1, 1 if CHANNELS_INNER else BLOCK_R):
            n, s, valid = _tile(u, v, a1, b1, base_n, S, cmask, IDX, CHANNELS_INNER, BLOCK_R)
            x = tl.load(X + _offsets(n, s, cs, sxn, sxc, sxs, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            dy = tl.load(DY + _offsets(n, s, cs, sdn, sdc, sds, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            if RELU:
                dy = tl.where(_relu_blocks(x, mean, a_out, shift, R, _offsets(n, s, cs, srn, src, srs, CHANNELS_INNER),
                                           valid, RESIDUAL, ACC), 0.0, dy)
            acc_dyx += dy * tl.where(valid, (x - mean) * rstd, 0.0)
            acc_dy += dy
    slot = (g * splits + sp) * C + cs
    tl.store(PART + slot, channel_sums(acc_dyx, CHANNELS_INNER), mask=cmask)
    tl.store(PART + plane + slot, channel_sums(acc_dy, CHANNELS_INNER), mask=cmask)


@triton.jit
def _channel_grads(W, B, MASK, NOISE, NOISE_B, PART, DMASK, DNOISE, DNOISE_B, DW, DB, cs, cmask, C, G, splits,
                   plane, s_noise, s_noise_b, HAS_NOISE: tl.constexpr, HAS_NOISE_B: tl.constexpr,
                   NEED_DMASK: tl.constexpr, NEED_DNOISE: tl.constexpr, NEED_DNOISE_B: tl.constexpr,
                   NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """The per-channel gradients of channels ``cs`` that are asked for, from each group's Sdyx and
    Sdy merged from ``PART``, over the groups in order: d noise[g] = w * Sdyx_g,
    d noise_bias[g] = b * Sdy_g, d mask = w * sum Sdyx_g, d w = sum (mask + noise[g]) * Sdyx_g,
    d b = sum (1 + noise_bias[g]) * Sdy_g."""
    sum_dyx = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_dw = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_db = tl.zeros((BLOCK_C,), dtype=ACC)
    for g in range(0, G):
        w, b, factor, bias_factor = _group_affine(W, B, MASK, NOISE, NOISE_B, g, cs, cmask, s_noise, s_noise_b,
                                                  HAS_NOISE, HAS_NOISE_B, ACC)
        sdyx, sdy = _merge_sums(PART, plane, g, cs, cmask, C, splits, ACC, BLOCK_P, BLOCK_C)
        if NEED_DNOISE:
            tl.store(DNOISE + g * C + cs, (w * sdyx).to(DNOISE.dtype.element_ty), mask=cmask)
        if NEED_DNOISE_B:
            tl.store(DNOISE_B + g * C + cs, (b * sdy).to(DNOISE_B.dtype.element_ty), mask=cmask)
        sum_dyx += sdyx
        sum_dw += factor * sdyx
        sum_db += bias_factor * sdy
    if NEED_DMASK:
        w = tl.load(W + cs, mask=cmask, other=0.0).to(ACC)
        tl.store(DMASK + cs, (w * sum_dyx).to(DMASK.dtype.element_ty), mask=cmask)
    if NEED_DW:
        tl.store(DW + cs, sum_dw.to(DW.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(DB + cs, sum_db.to(DB.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def bn_grad_apply_kernel(X, DY, DX, R, DR, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD, PART,
                         DMASK, DNOISE, DNOISE_B, DW, DB,
                         C, S, Ng, G, sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, srn, src, srs, sqn, sqc, sqs,
                         s_noise, s_noise_b, C_BLOCKS, splits, U0, U1, Q, T, splits_s, plane,
                         TRAINING: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_NOISE_B: tl.constexpr,
                         RELU: tl.constexpr, RESIDUAL: tl.constexpr, NEED_DX: tl.constexpr, NEED_DR: tl.constexpr,
                         NEED_DMASK: tl.constexpr, NEED_DNOISE: tl.constexpr, NEED_DNOISE_B: tl.constexpr,
                         NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                         ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid ``(G * splits * C_BLOCKS,)`` with ``NEED_DX`` or ``NEED_DR``, else ``(C_BLOCKS,)``. With
    Sdy and Sdyx group g's sums merged from ``PART`` in split order, each program writes for the
    rows of its split dx = w * (mask + noise[g]) * rstd * (dy - Sdy/M - xhat * Sdyx/M) (training)
    or w * (mask + noise[g]) * rstd * dy (eval, no sums needed), dy zeroed where the recomputed
    output (the residual r added with ``RESIDUAL``) is <= 0 with ``RELU``; and, with ``NEED_DR``,
    that zeroed dy itself, the residual's gradient. The program of group 0, split 0 of each channel
    block first writes the per-channel gradients that are asked for (:func:`_channel_grads`)."""
    if NEED_DX or NEED_DR:
        g, sp, cb = _decode(C_BLOCKS, splits)
    else:
        g, sp, cb = 0, 0, tl.program_id(0)
    cs, cmask = _channels(cb, C, BLOCK_C)
    if NEED_DMASK or NEED_DNOISE or NEED_DNOISE_B or NEED_DW or NEED_DB:
        if (g == 0) & (sp == 0):
            _channel_grads(W, B, MASK, NOISE, NOISE_B, PART, DMASK, DNOISE, DNOISE_B, DW, DB, cs, cmask, C, G, splits,
                           plane, s_noise, s_noise_b, HAS_NOISE, HAS_NOISE_B, NEED_DMASK, NEED_DNOISE, NEED_DNOISE_B,
                           NEED_DW, NEED_DB, ACC, BLOCK_P, BLOCK_C)
    M = Ng * S
    if NEED_DX or NEED_DR:
        w, b, factor, bias_factor = _group_affine(W, B, MASK, NOISE, NOISE_B, g, cs, cmask, s_noise, s_noise_b,
                                                  HAS_NOISE, HAS_NOISE_B, ACC)
        rstd = tl.load(RSTD + g * C + cs, mask=cmask, other=0.0).to(ACC)
        a = col(w * factor * rstd, CHANNELS_INNER)
        if TRAINING or RELU:
            mean = col(tl.load(MEAN + g * C + cs, mask=cmask, other=0.0).to(ACC), CHANNELS_INNER)
        if RELU:
            a_out, shift = _output_affine(rstd, w, factor, b, bias_factor, CHANNELS_INNER)
        if TRAINING and NEED_DX:
            sdyx, sdy = _merge_sums(PART, plane, g, cs, cmask, C, splits, ACC, BLOCK_P, BLOCK_C)
            c1 = col(sdy / M, CHANNELS_INNER)
            c2 = col(sdyx / M, CHANNELS_INNER)
            rstd_t = col(rstd, CHANNELS_INNER)
        base_n = g * Ng
        a0, a1, b0, b1 = _split_bounds(sp, U0, U1, Q, T, splits_s)
        for u in range(a0, a1, BLOCK_R if CHANNELS_INNER else 1):
            for v in range(b0, b1, 1 if CHANNELS_INNER else BLOCK_R):
                n, s, valid = _tile(u, v, a1, b1, base_n, S, cmask, IDX, CHANNELS_INNER, BLOCK_R)
                dy = tl.load(DY + _offsets(n, s, cs, sdn, sdc, sds, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
                if (TRAINING and NEED_DX) or RELU:
                    x = tl.load(X + _offsets(n, s, cs, sxn, sxc, sxs, CHANNELS_INNER), mask=valid,
                                other=0.0).to(ACC)
                if RELU:
                    dy = tl.where(_relu_blocks(x, mean, a_out, shift, R,
                                               _offsets(n, s, cs, srn, src, srs, CHANNELS_INNER), valid, RESIDUAL,
                                               ACC), 0.0, dy)
                if NEED_DR:
                    tl.store(DR + _offsets(n, s, cs, sqn, sqc, sqs, CHANNELS_INNER), dy.to(DR.dtype.element_ty),
                             mask=valid)
                if NEED_DX:
                    if TRAINING:
                        dx = a * (dy - c1 - (x - mean) * rstd_t * c2)
                    else:
                        dx = a * dy
                    tl.store(DX + _offsets(n, s, cs, sgn, sgc, sgs, CHANNELS_INNER), dx.to(DX.dtype.element_ty),
                             mask=valid)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------
PROGRAMS_PER_SM = 4  # aim: this many programs per SM ...
MIN_PROGRAM_VALUES = 4096  # ... each reducing at least this many values (16 KB of fp32)
TILE_BYTES = 8192  # bytes of x a tile holds (2048 fp32 values)
ROW_BYTES = 256  # channels a channels-inner tile row spans (64 fp32) ...
MIN_ROW_BYTES = 64  # ... or fewer (two 32-byte sectors), when that is what fills the GPU
MAX_POSITIONS = 1024  # positions a positions-inner tile spans at most
MERGE_TILE = 1024  # partials a program merges per step
PREFERRED_SPLITS = 64  # narrower channel blocks rather than more splits beyond this (shorter merges)
INTERPRET_TILE = 16384  # values a tile holds under Triton's interpreter (programs run one by one, so
INTERPRET_ROW = 256  # few large ones are fastest), channels a channels-inner row spans there


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How a BatchNorm of one shape runs: the tiles, the row splits and the 1-D grid.

    ``channels_inner``: tiles (BLOCK_R rows, BLOCK_C channels); else (BLOCK_C channels, BLOCK_R
    positions of one sample). A split covers ``Q x T`` units of the ``U0 x U1`` domain (rows x 1,
    or samples x positions), ``splits_s`` of them along U1; ``splits`` in all per group and channel
    block. Every kernel that touches the activations runs on ``programs`` programs."""

    channels_inner: bool
    block_r: int
    block_c: int
    block_p: int
    warps: int
    channel_blocks: int
    splits: int
    splits_s: int
    domain: tuple[int, int]  # (U0, U1)
    split_size: tuple[int, int]  # (Q, T)
    programs: int

    @property
    def split_args(self) -> tuple[int, ...]:
        """The kernels' ``C_BLOCKS, splits, U0, U1, Q, T, splits_s`` arguments."""
        return (self.channel_blocks, self.splits, *self.domain, *self.split_size, self.splits_s)


@functools.lru_cache(maxsize=4096)
def launch_plan(shape: tuple[int, int, int], strides: tuple[int, int, int], groups: int, sms: int,
                itemsize: int, *, splits: int | None = None, tile: tuple[int, int] | None = None,
                warps: int | None = None, interpret: bool = False, residual: bool = False) -> LaunchPlan:
    """The launch plan of a BatchNorm on an (N, C, S) view with these (sample, channel, spatial)
    strides, ``groups`` groups, on a GPU with ``sms`` SMs, for ``itemsize``-byte values. Pure
    (cached): runs on every call.

    - Layout: positions inner when the spatial axis is the contiguous one (NCHW), else channels
      inner (channels_last, (N, C), and any other strides: the kernels take any).
    - Tiles of about ``TILE_BYTES`` of x with the contiguous axis innermost: up to ``ROW_BYTES``
      of channels a row, or up to ``MAX_POSITIONS`` positions by as many channels as fit (half
      as many values when S % 16 != 0, e.g. 7x7 or 14x14: Triton then cannot prove the rows
      aligned and reads value by value, each value holding its own address in registers).
    - Programs: about ``PROGRAMS_PER_SM`` per SM, fewer when each would reduce fewer than
      ``MIN_PROGRAM_VALUES`` values; at most one split per tile, and splits <= sqrt(M * itemsize / 16)
      per group (each program re-reads its group's partials: this keeps those reads under a
      quarter of its own traffic). Channel blocks narrow (down to ``MIN_ROW_BYTES`` a row) while
      more than ``PREFERRED_SPLITS`` splits, or more than those caps allow, would be needed to
      reach the programs wanted.
    - ``splits`` / ``tile`` / ``warps`` (tests, and the plan sweep of
      ``fastpurify.benchmarks.bn_plans``): force about that many splits per group and channel
      block (rounded so that none is empty), a (BLOCK_R, BLOCK_C) tile and the warps a program.
    - ``residual``: the kernels also read a residual (and write its gradient): tiles of rows read
      value by value are halved once more (160 registers a thread at 14x14 NCHW otherwise).
    - ``interpret`` (Triton's interpreter on CPU, which runs programs one after another): tiles
      of ``INTERPRET_TILE`` values, rows of up to ``INTERPRET_ROW`` channels, one split unless
      forced. The code paths are the same; only the sizes differ.

    The grid is 1-D, so no shape exceeds a grid dimension."""
    n, c, s = shape
    _, sc, ss = strides
    ng = n // groups
    m = ng * s
    channels_inner = not (ss == 1 and s > 1 and sc != 1)
    tile_values = max(256, TILE_BYTES // itemsize)
    row_values = max(1, ROW_BYTES // itemsize)
    if not channels_inner and s % 16:  # Triton knows rows of positions aligned only when S % 16 == 0: other
        tile_values //= 2  # rows are read value by value, each with its own address (registers) ...
        if residual:  # ... and a residual and its gradient are two tensors more to address
            tile_values //= 2
    want = max(1, min(PROGRAMS_PER_SM * sms, n * c * s // MIN_PROGRAM_VALUES))
    if interpret:
        tile_values, row_values, want = INTERPRET_TILE, INTERPRET_ROW, 1
    if tile is not None:
        block_r, block_c = tile
    elif channels_inner:
        block_c = min(pow2(c), row_values)
        min_c = min(block_c, max(1, MIN_ROW_BYTES // itemsize))
    else:
        block_r = min(pow2(s), MAX_POSITIONS, tile_values)
        block_c = min(pow2(c), max(1, tile_values // block_r))
        min_c = 1
    merge_cap = max(1, math.isqrt(m * itemsize // 16))
    while True:
        if tile is None and channels_inner:
            block_r = max(1, min(pow2(m), tile_values // block_c))
        tiles = triton.cdiv(m, block_r) if channels_inner else ng * triton.cdiv(s, block_r)
        channel_blocks = triton.cdiv(c, block_c)
        if splits is not None:
            wanted = splits
        else:
            wanted = min(triton.cdiv(want, groups * channel_blocks), merge_cap)
        wanted = max(1, min(wanted, tiles))
        enough = groups * channel_blocks * wanted >= want and wanted <= PREFERRED_SPLITS
        if splits is not None or tile is not None or block_c <= min_c or enough:
            break
        block_c //= 2
    if channels_inner:  # Q rows (whole tiles) a split
        q = triton.cdiv(tiles, wanted) * block_r
        domain, size, splits_s, count = (m, 1), (q, 1), 1, triton.cdiv(m, q) if m else 1
    else:  # Q samples by T positions (whole tiles) a split: samples first
        s_tiles = triton.cdiv(s, block_r)
        q = triton.cdiv(ng, min(wanted, ng)) if ng else 1
        along_n = triton.cdiv(ng, q) if ng else 1
        t = triton.cdiv(s_tiles, max(1, min(wanted // along_n, s_tiles))) * block_r
        splits_s = triton.cdiv(s, t)
        domain, size, count = (ng, s), (q, t), along_n * splits_s
    block_p = min(pow2(count), max(1, MERGE_TILE // block_c))
    values = block_r * block_c
    warps = warps or (4 if values <= 2048 else 8)
    return LaunchPlan(channels_inner, block_r, block_c, block_p, warps, channel_blocks, count, splits_s, domain, size,
                      groups * count * channel_blocks)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, spatial) strides of a tensor viewed as (N, C, S)."""
    return t.stride(0), t.stride(1), (t.stride(2) if t.dim() == 3 else 0)


def _geometry(x3: torch.Tensor, others, groups: int, splits, tile, warps=None, residual: bool = False):
    """(plan, (S, Ng), strides of x3 and of each of ``others``, index type) as the kernels take
    them. When every tensor's rows merge (sample stride = S * spatial stride: channels_last,
    (N, C)), the rows are passed as one axis (S = 1), so that the kernels need no division."""
    n, c = x3.shape[:2]
    s = x3.shape[2] if x3.dim() == 3 else 1
    tensors = [x3, *others]
    strides = [_strides(t) for t in tensors]
    plan = launch_plan((n, c, s), strides[0], groups, sm_count(x3.device), x3.element_size(), splits=splits,
                       tile=tile, warps=warps, interpret=interpreting() and not x3.is_cuda, residual=residual)
    assert 2 * groups * plan.splits * c < 2**31, "the partial statistics are indexed in int32"
    ng = n // groups
    if plan.channels_inner and s > 1 and all(sn == s * ss for sn, _, ss in strides):
        strides = [(ss, sc, 0) for _, sc, ss in strides]
        ng, s = ng * s, 1
    return plan, (s, ng), strides, index_type(tensors)


def bn_forward(x3: torch.Tensor, y3: torch.Tensor, weight, bias, mask, noise, noise_bias, running_mean,
               running_var, mean: torch.Tensor, rstd: torch.Tensor, *, groups: int, training: bool,
               update_running: bool, momentum: float, eps: float, relu: bool = False,
               residual3: torch.Tensor | None = None, splits: int | None = None,
               tile: tuple[int, int] | None = None, warps: int | None = None) -> None:
    """Launch the forward on (N, C, S) views ``x3`` -> ``y3`` (``residual3``: added to the output;
    ``relu``: ReLU of the output); fills ``mean``/``rstd`` (G, C) and, if ``update_running``, the
    running statistics in place (exactly once). ``splits``, ``tile`` and ``warps`` override the
    launch plan (tests, the plan sweep)."""
    C = x3.shape[1]
    r3 = x3 if residual3 is None else residual3  # never read without a residual
    plan, (S, Ng), (sx, sy, sr), idx = _geometry(x3, [y3, r3], groups, splits, tile, warps, residual3 is not None)
    acc = accumulator_dtype(x3.dtype)
    part = torch.empty(2, groups, plan.splits, C, dtype=mean.dtype, device=x3.device) if training else mean
    plane = groups * plan.splits * C
    grid = (plan.programs,)
    common = dict(ACC=acc, IDX=idx, CHANNELS_INNER=plan.channels_inner, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
                  num_warps=plan.warps)
    if training:
        bn_stats_kernel[grid](x3, part, C, S, Ng, *sx, *plan.split_args, plane, **common)
    pick = lambda t: t if t is not None else mean  # noqa: E731  (never read nor written)
    bn_normalize_kernel[grid](
        x3, y3, r3, weight, bias, mask, pick(noise), pick(noise_bias), pick(running_mean), pick(running_var),
        mean, rstd, part, C, S, Ng, groups, *sx, *sy, *sr, row_stride(noise), row_stride(noise_bias),
        float(eps), float(momentum), *plan.split_args, plane,
        TRAINING=training, UPDATE_RUNNING=update_running, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, RELU=relu, RESIDUAL=residual3 is not None, BLOCK_P=plan.block_p,
        **common)


def bn_backward(x3, dy3, dx3, weight, bias, mask, noise, noise_bias, mean, rstd, *, groups: int,
                training: bool, dmask=None, dnoise=None, dnoise_bias=None, dweight=None, dbias=None,
                relu: bool = False, residual3=None, dresidual3=None, splits: int | None = None,
                tile: tuple[int, int] | None = None, warps: int | None = None) -> None:
    """Launch the backward; writes ``dx3`` (if given) and each per-channel gradient buffer that
    is given (None: not needed, no work spent on it); ``relu``: the forward's output went through
    a fused ReLU (recomputed from ``x3``, and ``residual3`` where the forward added it, so nothing
    more is saved); ``dresidual3`` (with ``relu``): the residual's gradient, dy where the output
    was positive. The per-split sums are computed only when something needs them (training-mode
    dx, or any per-channel gradient). ``splits``, ``tile`` and ``warps`` override the launch plan
    (tests, the plan sweep)."""
    C = x3.shape[1]
    assert dresidual3 is None or (relu and residual3 is not None), "a residual's gradient needs the fused ReLU"
    need_params = any(t is not None for t in (dmask, dnoise, dnoise_bias, dweight, dbias))
    if dx3 is None and dresidual3 is None and not need_params:
        return
    r3 = x3 if residual3 is None else residual3  # placeholders: never read nor written
    dr3 = x3 if dresidual3 is None else dresidual3
    plan, (S, Ng), (sx, sd, sg, sr, sq), idx = _geometry(x3, [dy3, dx3 if dx3 is not None else x3, r3, dr3],
                                                         groups, splits, tile, warps, residual3 is not None)
    acc = accumulator_dtype(x3.dtype)
    need_sums = need_params or (training and dx3 is not None)
    part = torch.empty(2, groups, plan.splits, C, dtype=mean.dtype, device=x3.device) if need_sums else mean
    plane = groups * plan.splits * C
    common = dict(ACC=acc, IDX=idx, CHANNELS_INNER=plan.channels_inner, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
                  num_warps=plan.warps)
    pick = lambda t: t if t is not None else mean  # noqa: E731  (never read nor written)
    residual = residual3 is not None
    if need_sums:
        bn_grad_sums_kernel[(plan.programs,)](
            x3, dy3, r3, weight, bias, mask, pick(noise), pick(noise_bias), mean, rstd, part, C, S, Ng, *sx, *sd,
            *sr, row_stride(noise), row_stride(noise_bias), *plan.split_args, plane, HAS_NOISE=noise is not None,
            HAS_NOISE_B=noise_bias is not None, RELU=relu, RESIDUAL=residual, **common)
    rows = dx3 is not None or dresidual3 is not None
    grid = (plan.programs if rows else plan.channel_blocks,)
    bn_grad_apply_kernel[grid](
        x3, dy3, pick(dx3), r3, dr3, weight, bias, mask, pick(noise), pick(noise_bias), mean, rstd, part,
        pick(dmask), pick(dnoise), pick(dnoise_bias), pick(dweight), pick(dbias),
        C, S, Ng, groups, *sx, *sd, *sg, *sr, *sq, row_stride(noise), row_stride(noise_bias), *plan.split_args,
        plane, TRAINING=training, HAS_NOISE=noise is not None, HAS_NOISE_B=noise_bias is not None, RELU=relu,
        RESIDUAL=residual, NEED_DX=dx3 is not None, NEED_DR=dresidual3 is not None, NEED_DMASK=dmask is not None,
        NEED_DNOISE=dnoise is not None, NEED_DNOISE_B=dnoise_bias is not None, NEED_DW=dweight is not None,
        NEED_DB=dbias is not None, BLOCK_P=plan.block_p, **common)
