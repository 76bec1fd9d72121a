"""Masked-and-perturbed GroupNorm as split, deterministic two-stage reductions sized to fill the GPU.

The input is seen as ``(N, C, S)`` through three strides (sample, channel, spatial): 2-D
``(N, C)`` (S = 1), contiguous NCHW and channels_last NHWC, without copies. GroupNorm with
``K = num_groups`` normalises each *row* ``r = n * K + k`` -- sample n, channels
``[k * Cg, (k + 1) * Cg)`` with ``Cg = C / K``, all S positions, ``M = Cg * S`` values -- with its
own mean and biased variance. The batch holds ``G`` equal contiguous *batch groups* of
``Ng = N / G`` samples (``groups`` in fastpurify.functional); they only pick the affine: a row of
sample n uses, per channel c, ``scale = w * (mask + noise[g])`` and ``shift = b * (1 + noise_bias[g])``
with ``g = n // Ng`` (DESIGN.md §1).

**Work split.** A row's ``Cg x S`` domain is cut into ``splits = splits_c * splits_s`` rectangles
of whole tiles (``QCT`` channel tiles by ``QST`` position tiles, the last ones shorter); every kernel that
touches the activations runs on one 1-D grid of ``R * splits`` programs, program
``pid = r * splits + sp``, ``sp = spc * splits_s + sps``. :func:`launch_plan` picks the tiles and
the splits from the shape, the strides and the SM count.

**Tiles** keep the contiguous axis innermost: ``(BLOCK_C, BLOCK_S)`` channels by positions when
positions are contiguous (NCHW, ``LaunchPlan.pos_inner``), else ``(BLOCK_S, BLOCK_C)`` positions by
channels (channels_last, (N, C); the kernels' ``CHANNELS_INNER``, as in the BatchNorm kernels).

**Forward**: ``gn_stats_kernel`` reduces each split to its mean and M2 from sums shifted by the
row's first value x0 and stores ``mean - x0`` and M2 in a small ``(2, R, splits)`` buffer;
``gn_normalize_kernel``, on the same grid, merges its row's partials in split order (Chan et
al.) and normalises its own split. **Backward**: ``gn_grad_sums_kernel`` writes, per sample,
channel and position split, ``sum(dy * xhat)`` and ``sum(dy)`` into a ``(2, N, splits_s, C)``
buffer. Those serve both the input gradient (per row, ``A = sum_c s_c Sdyx_c`` and
``B = sum_c s_c Sdy_c``) and the per-channel parameter gradients: ``gn_param_sums_kernel`` sums
chunks of each batch group's samples into ``(2, G, P2, C)``, and ``gn_grad_apply_kernel`` writes
dx for its split, its first ``cdiv(C, BLOCK_C3)`` programs first merging those chunks into the
parameter gradients. Every merge is a fixed-order sum over the same partials (no atomics), so
results are bitwise reproducible, and every program of a row computes the same statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .norm_common import (channel_sums, col, group_scale, group_shift, index_type, param_grads, pow2, row_stride,
                          tile_zeros)
from .runtime import accumulator_dtype, interpreting, sm_count

# Integer arguments that need no specialisation (== 1 or divisibility by 16): they do not decide
# how memory is accessed (the strides do), and specialising on them would compile a variant per
# shape (and turn a size of 1 into a constant that arithmetic on it must expect).
NOT_SPECIALIZED = ("S", "K", "Ng", "G", "splits", "splits_s", "QCT", "QST", "P2", "Q2", "C_BLOCKS", "CB3", "s_noise",
                   "s_noise_b", "plane", "plane2")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode(splits, splits_s, QCT, QST, Cg, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row r, split sp, position split sps of this program on the ``R * splits`` grid, and the
    split's channels ``[c0, c1)`` (inside the row) and positions ``[s0, s1)``: ``QCT`` channel
    tiles by ``QST`` position tiles (starts that Triton knows to be multiples of the tile, so
    that it can vectorise the loads)."""
    pid = tl.program_id(0)
    r = pid // splits
    sp = pid % splits
    sps = sp % splits_s
    c0 = (sp // splits_s) * QCT * BLOCK_C
    s0 = sps * QST * BLOCK_S
    return r, sp, sps, c0, tl.minimum(c0 + QCT * BLOCK_C, Cg), s0, tl.minimum(s0 + QST * BLOCK_S, S)


@triton.jit
def _row_base(r, K, Cg, sn, sc, IDX: tl.constexpr):
    """Sample n and row-group k of row r, and the offset of the row's first value (channel k * Cg, position 0)."""
    n = r // K
    k = r % K
    return n, k, n.to(IDX) * sn + (k * Cg).to(IDX) * sc


@triton.jit
def _offsets(base, cs, ss, sc, ss_, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    """Offsets of the tile of channels ``cs`` (inside the row) and positions ``ss`` from ``base``."""
    if CHANNELS_INNER:
        return base + (ss.to(IDX) * ss_)[:, None] + (cs.to(IDX) * sc)[None, :]
    else:
        return base + (cs.to(IDX) * sc)[:, None] + (ss.to(IDX) * ss_)[None, :]


@triton.jit
def _both(cvalid, svalid, CHANNELS_INNER: tl.constexpr):
    """The tile's validity from its channels' and positions'."""
    if CHANNELS_INNER:
        return svalid[:, None] & cvalid[None, :]
    else:
        return cvalid[:, None] & svalid[None, :]


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def gn_stats_kernel(X, PART, C, S, Cg, K, sxn, sxc, sxs, splits, splits_s, QCT, QST, plane,
                    ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """Grid ``(R * splits,)``. Each program reduces its split of its row, tile by tile, to sums of
    x - x0 and (x - x0)^2 (x0: the row's first value; per-lane accumulators in ACC) and stores
    the split's mean - x0 and M2 into ``PART[0, r, sp]`` and ``PART[1, r, sp]``."""
    r, sp, sps, c0, c1, s0, s1 = _decode(splits, splits_s, QCT, QST, Cg, S, BLOCK_C, BLOCK_S)
    n, k, base = _row_base(r, K, Cg, sxn, sxc, IDX)
    pivot = tl.load(X + base).to(ACC)
    acc1 = tile_zeros(ACC, CHANNELS_INNER, BLOCK_S, BLOCK_C)
    acc2 = tile_zeros(ACC, CHANNELS_INNER, BLOCK_S, BLOCK_C)
    for c in range(c0, c1, BLOCK_C):
        cs = c + tl.arange(0, BLOCK_C)
        for s in range(s0, s1, BLOCK_S):
            ss = s + tl.arange(0, BLOCK_S)
            valid = _both(cs < c1, ss < s1, CHANNELS_INNER)
            x = tl.load(X + _offsets(base, cs, ss, sxc, sxs, IDX, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            d = tl.where(valid, x - pivot, 0.0)
            acc1 += d
            acc2 += d * d
    count = ((c1 - c0) * (s1 - s0)).to(ACC)
    t1 = tl.sum(tl.sum(acc1, axis=1), axis=0)
    t2 = tl.sum(tl.sum(acc2, axis=1), axis=0)
    slot = r * splits + sp
    tl.store(PART + slot, t1 / count)
    tl.store(PART + plane + slot, tl.maximum(t2 - t1 * t1 / count, 0.0))


@triton.jit
def _merge_stats(PART, plane, r, splits, splits_s, QCT, QST, Cg, S, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mean minus the row's pivot x0, and biased variance, of row r from its splits'
    (mean_i - x0, M2_i): with k = split 0's and d_i = (mean_i - x0) - k, mean - x0 = k + sum(n_i d_i) / M
    and M2 = sum(M2_i + n_i d_i^2) - (sum n_i d_i)^2 / M (Chan et al.), BLOCK_P splits at a time
    in a fixed order."""
    row = r * splits
    k0 = tl.load(PART + row).to(ACC)
    acc1 = tl.zeros((BLOCK_P,), dtype=ACC)
    acc2 = tl.zeros((BLOCK_P,), dtype=ACC)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        valid = p < splits
        c0 = (p // splits_s) * QCT * BLOCK_C
        s0 = (p % splits_s) * QST * BLOCK_S
        count = ((tl.minimum(c0 + QCT * BLOCK_C, Cg) - c0) * (tl.minimum(s0 + QST * BLOCK_S, S) - s0)).to(ACC)
        d = tl.where(valid, tl.load(PART + row + p, mask=valid, other=0.0).to(ACC) - k0, 0.0)
        acc1 += count * d
        acc2 += tl.load(PART + plane + row + p, mask=valid, other=0.0).to(ACC) + count * d * d
    m = (Cg * S).to(ACC)
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    return k0 + s1 / m, tl.maximum(s2 - s1 * s1 / m, 0.0) / m


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def gn_normalize_kernel(X, Y, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD, PART, C, S, Cg, K, Ng, sxn, sxc, sxs,
                        syn, syc, sys_, s_noise, s_noise_b, eps, splits, splits_s, QCT, QST, plane,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr,
                        HAS_NOISE_B: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid ``(R * splits,)``. Each program merges its row's mean and variance from all the
    row's splits in ``PART``, writes y = (x - mean) * rstd * w * (mask + noise[g]) + b * (1 + noise_bias[g])
    for its split (g: its sample's batch group), and, if it is split 0, saves mean and
    rstd = 1/sqrt(var + eps) to ``MEAN``/``RSTD`` (R,)."""
    r, sp, sps, c0, c1, s0, s1 = _decode(splits, splits_s, QCT, QST, Cg, S, BLOCK_C, BLOCK_S)
    n, k, xbase = _row_base(r, K, Cg, sxn, sxc, IDX)
    _, _, ybase = _row_base(r, K, Cg, syn, syc, IDX)
    mean, var = _merge_stats(PART, plane, r, splits, splits_s, QCT, QST, Cg, S, ACC, BLOCK_P, BLOCK_C, BLOCK_S)
    mean += tl.load(X + xbase).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    if sp == 0:
        tl.store(MEAN + r, mean)
        tl.store(RSTD + r, rstd)
    g = n // Ng
    for c in range(c0, c1, BLOCK_C):
        cs = c + tl.arange(0, BLOCK_C)
        cvalid = cs < c1
        ch = k * Cg + cs
        a = col(rstd * group_scale(W, MASK, NOISE, g, ch, cvalid, s_noise, HAS_W, HAS_NOISE, ACC), CHANNELS_INNER)
        shift = col(group_shift(B, NOISE_B, g, ch, cvalid, s_noise_b, HAS_B, HAS_NOISE_B, ACC), CHANNELS_INNER)
        for s in range(s0, s1, BLOCK_S):
            ss = s + tl.arange(0, BLOCK_S)
            valid = _both(cvalid, ss < s1, CHANNELS_INNER)
            x = tl.load(X + _offsets(xbase, cs, ss, sxc, sxs, IDX, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            y = (x - mean) * a + shift
            tl.store(Y + _offsets(ybase, cs, ss, syc, sys_, IDX, CHANNELS_INNER), y.to(Y.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def gn_grad_sums_kernel(X, DY, MEAN, RSTD, PART, C, S, Cg, K, sxn, sxc, sxs, sdn, sdc, sds, splits, splits_s, QCT,
                        QST, plane, ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid ``(R * splits,)``. Each program, for each channel c of its split, sums dy * xhat and dy
    over the split's positions (xhat recomputed from x and the row's saved statistics;
    per-lane accumulators in ACC) and stores them into ``PART[0, n, sps, c]`` and
    ``PART[1, n, sps, c]`` (every slot written by exactly one program)."""
    r, sp, sps, c0, c1, s0, s1 = _decode(splits, splits_s, QCT, QST, Cg, S, BLOCK_C, BLOCK_S)
    n, k, xbase = _row_base(r, K, Cg, sxn, sxc, IDX)
    _, _, dbase = _row_base(r, K, Cg, sdn, sdc, IDX)
    mean = tl.load(MEAN + r).to(ACC)
    rstd = tl.load(RSTD + r).to(ACC)
    slot = (n * splits_s + sps) * C + k * Cg
    for c in range(c0, c1, BLOCK_C):
        cs = c + tl.arange(0, BLOCK_C)
        cvalid = cs < c1
        acc_dyx = tile_zeros(ACC, CHANNELS_INNER, BLOCK_S, BLOCK_C)
        acc_dy = tile_zeros(ACC, CHANNELS_INNER, BLOCK_S, BLOCK_C)
        for s in range(s0, s1, BLOCK_S):
            ss = s + tl.arange(0, BLOCK_S)
            valid = _both(cvalid, ss < s1, CHANNELS_INNER)
            x = tl.load(X + _offsets(xbase, cs, ss, sxc, sxs, IDX, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            dy = tl.load(DY + _offsets(dbase, cs, ss, sdc, sds, IDX, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
            acc_dyx += dy * tl.where(valid, (x - mean) * rstd, 0.0)
            acc_dy += dy
        tl.store(PART + slot + cs, channel_sums(acc_dyx, CHANNELS_INNER), mask=cvalid)
        tl.store(PART + plane + slot + cs, channel_sums(acc_dy, CHANNELS_INNER), mask=cvalid)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def gn_param_sums_kernel(PART, PART2, C, Ng, G, splits_s, P2, Q2, C_BLOCKS, plane, plane2, ACC: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(G * P2 * C_BLOCKS,)``. Program ``(g * P2 + p) * C_BLOCKS + cb`` sums, for its BLOCK_C
    channels, the per-sample partials ``PART[:, n, sps, c]`` of chunk p (``Q2`` consecutive
    (sample, position split) pairs) of batch group g, BLOCK_Q at a time in a fixed order, into
    ``PART2[:, g, p, c]``."""
    pid = tl.program_id(0)
    cb = pid % C_BLOCKS
    rest = pid // C_BLOCKS
    p = rest % P2
    g = rest // P2
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cvalid = cs < C
    rows = Ng * splits_s
    j0 = p * Q2
    j1 = tl.minimum(j0 + Q2, rows)
    acc1 = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    acc2 = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    for j in range(j0, j1, BLOCK_Q):
        jj = j + tl.arange(0, BLOCK_Q)
        valid = (jj < j1)[:, None] & cvalid[None, :]
        offs = (g * rows + jj)[:, None] * C + cs[None, :]
        acc1 += tl.load(PART + offs, mask=valid, other=0.0).to(ACC)
        acc2 += tl.load(PART + plane + offs, mask=valid, other=0.0).to(ACC)
    slot = (g * P2 + p) * C + cs
    tl.store(PART2 + slot, tl.sum(acc1, axis=0), mask=cvalid)
    tl.store(PART2 + plane2 + slot, tl.sum(acc2, axis=0), mask=cvalid)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def gn_grad_apply_kernel(X, DY, DX, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD, PART, PART2,
                         DMASK, DNOISE, DNOISE_B, DW, DB, C, S, Cg, K, Ng, G, sxn, sxc, sxs, sdn, sdc, sds,
                         sgn, sgc, sgs, s_noise, s_noise_b, splits, splits_s, QCT, QST, plane, P2, CB3, plane2,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr,
                         HAS_NOISE_B: tl.constexpr, NEED_DX: tl.constexpr, NEED_DMASK: tl.constexpr,
                         NEED_DNOISE: tl.constexpr, NEED_DNOISE_B: tl.constexpr, NEED_DW: tl.constexpr,
                         NEED_DB: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_C3: tl.constexpr, BLOCK_P3: tl.constexpr):
    """Grid ``(R * splits,)`` with ``NEED_DX``, else ``(CB3,)``. Programs ``pid < CB3`` first write
    the per-channel gradients that are asked for, of channels ``[pid * BLOCK_C3, ...)``
    (:func:`param_grads`). With ``NEED_DX``, each program then merges its row's
    A = sum_c s_c Sdyx[n, c] and B = sum_c s_c Sdy[n, c] from ``PART`` (s_c = w * (mask + noise[g]),
    over the row's channels and position splits in a fixed order) and writes for its split
    dx = rstd * (dy * s_c - B / M - xhat * A / M)."""
    pid = tl.program_id(0)
    if NEED_DMASK or NEED_DNOISE or NEED_DNOISE_B or NEED_DW or NEED_DB:
        if pid < CB3:
            cs3 = pid * BLOCK_C3 + tl.arange(0, BLOCK_C3)
            param_grads(W, B, MASK, NOISE, NOISE_B, PART2, PART2 + plane2, DMASK, DNOISE, DNOISE_B, DW, DB, cs3,
                        cs3 < C, C, G, P2, s_noise, s_noise_b, HAS_W, HAS_B, HAS_NOISE, HAS_NOISE_B, NEED_DMASK,
                        NEED_DNOISE, NEED_DNOISE_B, NEED_DW, NEED_DB, ACC, tl.int32, BLOCK_P3, BLOCK_C3)
    if NEED_DX:
        r, sp, sps, c0, c1, s0, s1 = _decode(splits, splits_s, QCT, QST, Cg, S, BLOCK_C, BLOCK_S)
        n, k, xbase = _row_base(r, K, Cg, sxn, sxc, IDX)
        _, _, dbase = _row_base(r, K, Cg, sdn, sdc, IDX)
        _, _, gbase = _row_base(r, K, Cg, sgn, sgc, IDX)
        g = n // Ng
        mean = tl.load(MEAN + r).to(ACC)
        rstd = tl.load(RSTD + r).to(ACC)
        acc_a = tl.zeros((BLOCK_M,), dtype=ACC)
        acc_b = tl.zeros((BLOCK_M,), dtype=ACC)
        for j0 in range(0, Cg * splits_s, BLOCK_M):
            j = j0 + tl.arange(0, BLOCK_M)
            jvalid = j < Cg * splits_s
            ch = k * Cg + j % Cg
            s_c = group_scale(W, MASK, NOISE, g, ch, jvalid, s_noise, HAS_W, HAS_NOISE, ACC)
            offs = (n * splits_s + j // Cg) * C + ch
            acc_a += s_c * tl.load(PART + offs, mask=jvalid, other=0.0).to(ACC)
            acc_b += s_c * tl.load(PART + plane + offs, mask=jvalid, other=0.0).to(ACC)
        m = (Cg * S).to(ACC)
        a = tl.sum(acc_a, axis=0) / m
        b = tl.sum(acc_b, axis=0) / m
        for c in range(c0, c1, BLOCK_C):
            cs = c + tl.arange(0, BLOCK_C)
            cvalid = cs < c1
            scale = col(group_scale(W, MASK, NOISE, g, k * Cg + cs, cvalid, s_noise, HAS_W, HAS_NOISE, ACC),
                        CHANNELS_INNER)
            for s in range(s0, s1, BLOCK_S):
                ss = s + tl.arange(0, BLOCK_S)
                valid = _both(cvalid, ss < s1, CHANNELS_INNER)
                x = tl.load(X + _offsets(xbase, cs, ss, sxc, sxs, IDX, CHANNELS_INNER), mask=valid, other=0.0).to(ACC)
                dy = tl.load(DY + _offsets(dbase, cs, ss, sdc, sds, IDX, CHANNELS_INNER), mask=valid,
                             other=0.0).to(ACC)
                dx = rstd * (dy * scale - b - (x - mean) * rstd * a)
                tl.store(DX + _offsets(gbase, cs, ss, sgc, sgs, IDX, CHANNELS_INNER), dx.to(DX.dtype.element_ty),
                         mask=valid)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------
PROGRAMS_PER_SM = 4  # aim: this many programs per SM ...
MIN_PROGRAM_VALUES = 4096  # ... each reducing at least this many values (16 KB of fp32)
TILE_BYTES = 8192  # bytes of x a tile holds (2048 fp32 values)
ROW_BYTES = 256  # channels a channels-inner tile row spans (64 fp32)
NARROW_ROW = 16  # channels-inner tiles whose rows span fewer channels than this ...
NARROW_TILE = 512  # ... hold at most this many values
MAX_POSITIONS = 1024  # positions a positions-inner tile spans at most
MERGE_TILE = 1024  # partials a program merges per step
PARAM_ROW_BYTES = 256  # channels of the parameter-gradient partials a program sums (64 fp32) ...
MIN_PARAM_ROW_BYTES = 32  # ... or fewer (one 32-byte sector), when that is what fills the GPU
INTERPRET_TILE = 16384  # values a tile holds under Triton's interpreter (programs run one by one, so
INTERPRET_ROW = 256  # few large ones are fastest), channels a channels-inner row spans there


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How a GroupNorm of one shape runs.

    Activations: tiles of ``block_c`` channels by ``block_s`` positions (``pos_inner``: positions
    are the contiguous axis); each row cut into ``splits_c`` channel ranges of ``qc`` channels
    times ``splits_s`` position ranges of ``qs`` positions; ``programs = R * splits``.
    Parameter gradients: each batch group's ``Ng * splits_s`` per-sample partial rows summed in
    ``p2`` chunks of ``q2`` by ``param_programs = G * p2 * c_blocks2`` programs of ``block_c2``
    channels, then merged by ``cb3`` programs of ``block_c3`` channels."""

    pos_inner: bool
    block_c: int
    block_s: int
    warps: int
    splits_c: int
    splits_s: int
    qc: int
    qs: int
    block_p: int
    block_m: int
    programs: int
    p2: int
    q2: int
    block_q: int
    block_c2: int
    c_blocks2: int
    param_programs: int
    block_c3: int
    block_p3: int
    cb3: int

    @property
    def splits(self) -> int:
        return self.splits_c * self.splits_s

    @property
    def split_args(self) -> tuple[int, int, int, int]:
        """The kernels' ``splits, splits_s, QCT, QST`` arguments (tiles a split spans)."""
        return self.splits, self.splits_s, self.qc // self.block_c, self.qs // self.block_s


@functools.lru_cache(maxsize=4096)
def launch_plan(shape: tuple[int, int, int], strides: tuple[int, int, int], num_groups: int, groups: int, sms: int,
                itemsize: int, *, splits: tuple[int, int] | None = None, tile: tuple[int, int] | None = None,
                interpret: bool = False) -> LaunchPlan:
    """The launch plan of a GroupNorm with ``num_groups`` channel groups on an (N, C, S) view with
    these (sample, channel, spatial) strides, ``groups`` batch groups, on a GPU with ``sms`` SMs,
    for ``itemsize``-byte values. Pure (cached): runs on every call.

    - Layout: positions inner when the spatial axis is the contiguous one (NCHW), else channels
      inner (channels_last, (N, C), any other strides).
    - Tiles of about ``TILE_BYTES`` of x with the contiguous axis innermost: up to
      ``MAX_POSITIONS`` positions by as many of the row's channels as fit (half as many values
      when S % 16 != 0: Triton then cannot prove the rows aligned), or up to ``ROW_BYTES`` of
      channels a row (at most ``NARROW_TILE`` values when a row spans fewer than ``NARROW_ROW``
      channels: each short row needs its own address registers).
    - Splits: about ``PROGRAMS_PER_SM`` programs per SM over the R = N * num_groups rows, fewer
      when each would reduce fewer than ``MIN_PROGRAM_VALUES`` values, at most one split per
      tile; channel ranges first (the per-sample gradient partials then stay one per channel),
      position ranges when the row's channels are exhausted.
    - Parameter-gradient partials: about sqrt(Ng * splits_s) chunks per batch group, and
      channel blocks narrowed (down to ``MIN_PARAM_ROW_BYTES``), then more chunks, until at least
      ``sms`` programs.
    - ``splits`` / ``tile`` (tests): force about (channel splits, position splits) a row and a
      (BLOCK_C, BLOCK_S) tile. ``interpret`` (Triton's interpreter, programs run one after
      another): larger tiles, one split unless forced, the fewest parameter programs.

    The grids are 1-D, so no shape exceeds a grid dimension."""
    n, c, s = shape
    _, sc, ss = strides
    cg = c // num_groups
    rows = n * num_groups
    ng = n // groups
    pos_inner = ss == 1 and s > 1 and sc != 1
    tile_values = max(256, TILE_BYTES // itemsize)
    row_values = max(1, ROW_BYTES // itemsize)
    if pos_inner and s % 16:
        tile_values //= 2
    want = max(1, min(PROGRAMS_PER_SM * sms, n * c * s // MIN_PROGRAM_VALUES))
    param_want = sms
    if interpret:
        tile_values, row_values, want, param_want = INTERPRET_TILE, INTERPRET_ROW, 1, 1
    if tile is not None:
        block_c, block_s = tile
    elif pos_inner:
        block_s = min(pow2(s), MAX_POSITIONS, tile_values)
        block_c = min(pow2(cg), max(1, tile_values // block_s))
    else:
        block_c = min(pow2(cg), row_values)
        if block_c < NARROW_ROW:  # narrow rows of few channels (ResNet-GN's 2-8 on channels_last):
            tile_values = min(tile_values, NARROW_TILE)  # each short row needs its own addresses
        block_s = min(pow2(s), max(1, tile_values // block_c))
    c_tiles, s_tiles = triton.cdiv(cg, block_c), triton.cdiv(s, block_s)
    if splits is not None:
        wc, ws = splits
    else:
        per_row = max(1, min(triton.cdiv(want, max(rows, 1)), c_tiles * s_tiles))
        wc = min(per_row, c_tiles)
        ws = triton.cdiv(per_row, wc)
    wc, ws = max(1, min(wc, c_tiles)), max(1, min(ws, s_tiles))
    qc, qs = triton.cdiv(c_tiles, wc) * block_c, triton.cdiv(s_tiles, ws) * block_s
    splits_c, splits_s = triton.cdiv(cg, qc), triton.cdiv(s, qs)
    # Parameter-gradient partials: Ng * splits_s rows of C per batch group.
    prow = max(1, ng * splits_s)
    block_c2 = min(pow2(c), max(1, PARAM_ROW_BYTES // 4))
    p2 = min(prow, math.isqrt(prow - 1) + 1)
    while groups * p2 * triton.cdiv(c, block_c2) < param_want and block_c2 > MIN_PARAM_ROW_BYTES // 4:
        block_c2 //= 2
    c_blocks2 = triton.cdiv(c, block_c2)
    needed = triton.cdiv(param_want, groups * c_blocks2)
    q2 = triton.cdiv(prow, p2) if p2 >= needed else max(1, prow // needed)
    p2 = triton.cdiv(prow, q2)
    block_c3 = min(pow2(c), 64)
    values = block_c * block_s
    return LaunchPlan(
        pos_inner=pos_inner, block_c=block_c, block_s=block_s, warps=4 if values <= 2048 else 8,
        splits_c=splits_c, splits_s=splits_s, qc=qc, qs=qs,
        block_p=min(pow2(splits_c * splits_s), MERGE_TILE), block_m=min(pow2(cg * splits_s), MERGE_TILE),
        programs=rows * splits_c * splits_s, p2=p2, q2=q2, block_q=min(pow2(q2), max(1, MERGE_TILE // block_c2)),
        block_c2=block_c2, c_blocks2=c_blocks2, param_programs=groups * p2 * c_blocks2, block_c3=block_c3,
        block_p3=min(pow2(p2), max(1, MERGE_TILE // block_c3)), cb3=triton.cdiv(c, block_c3))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, spatial) strides of an (N, C, S) view."""
    return t.stride(0), t.stride(1), t.stride(2)


def plan_for(x3: torch.Tensor, num_groups: int, groups: int, splits=None, tile=None) -> LaunchPlan:
    """:func:`launch_plan` for the (N, C, S) view ``x3`` on its device."""
    return launch_plan(tuple(x3.shape), _strides(x3), num_groups, groups, sm_count(x3.device), x3.element_size(),
                       splits=splits, tile=tile, interpret=interpreting() and not x3.is_cuda)


def gn_forward(x3: torch.Tensor, y3: torch.Tensor, weight, bias, mask, noise, noise_bias, mean: torch.Tensor,
               rstd: torch.Tensor, *, num_groups: int, groups: int, eps: float,
               splits: tuple[int, int] | None = None, tile: tuple[int, int] | None = None) -> None:
    """Launch the forward on (N, C, S) views ``x3`` -> ``y3`` (any strides); fills ``mean``/``rstd``
    (N * num_groups,), in the accumulation precision, with each row's statistics. ``weight``/``bias``
    (C,) or None (ones/zeros), ``mask`` (C,), ``noise``/``noise_bias`` (G, C) with unit channel
    stride, or None. ``splits`` and ``tile`` override the launch plan (tests)."""
    n, c, s = x3.shape
    plan = plan_for(x3, num_groups, groups, splits, tile)
    rows = n * num_groups
    assert 2 * rows * plan.splits < 2**31, "the partial statistics are indexed in int32"
    part = torch.empty(2, rows, plan.splits, dtype=mean.dtype, device=x3.device)
    plane = rows * plan.splits
    common = dict(ACC=accumulator_dtype(x3.dtype), IDX=index_type([x3, y3]), CHANNELS_INNER=not plan.pos_inner,
                  BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.warps)
    grid = (plan.programs,)
    gn_stats_kernel[grid](x3, part, c, s, c // num_groups, num_groups, *_strides(x3), *plan.split_args, plane,
                          **common)
    pick = lambda t: t if t is not None else mask  # noqa: E731  (never read)
    gn_normalize_kernel[grid](
        x3, y3, pick(weight), pick(bias), mask, pick(noise), pick(noise_bias), mean, rstd, part,
        c, s, c // num_groups, num_groups, n // groups, *_strides(x3), *_strides(y3), row_stride(noise),
        row_stride(noise_bias), float(eps), *plan.split_args, plane,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, BLOCK_P=plan.block_p, **common)


def gn_backward(x3: torch.Tensor, dy3: torch.Tensor, dx3: torch.Tensor | None, weight, bias, mask, noise,
                noise_bias, mean: torch.Tensor, rstd: torch.Tensor, *, num_groups: int, groups: int, dmask=None,
                dnoise=None, dnoise_bias=None, dweight=None, dbias=None, splits: tuple[int, int] | None = None,
                tile: tuple[int, int] | None = None) -> None:
    """Launch the backward on (N, C, S) views: writes ``dx3`` (any strides) if given, and each
    parameter gradient buffer that is given (``dmask``/``dweight``/``dbias`` (C,),
    ``dnoise``/``dnoise_bias`` (G, C) contiguous; None: not needed, no work spent on it).
    ``splits`` and ``tile`` override the launch plan (tests)."""
    need_params = any(t is not None for t in (dmask, dnoise, dnoise_bias, dweight, dbias))
    if dx3 is None and not need_params:
        return
    n, c, s = x3.shape
    cg = c // num_groups
    plan = plan_for(x3, num_groups, groups, splits, tile)
    assert 2 * n * plan.splits_s * c < 2**31, "the per-sample partial sums are indexed in int32"
    acc = accumulator_dtype(x3.dtype)
    part = torch.empty(2, n, plan.splits_s, c, dtype=mean.dtype, device=x3.device)
    plane = n * plan.splits_s * c
    gx = dx3 if dx3 is not None else x3
    common = dict(ACC=acc, IDX=index_type([x3, dy3, gx]), CHANNELS_INNER=not plan.pos_inner, BLOCK_C=plan.block_c,
                  BLOCK_S=plan.block_s, num_warps=plan.warps)
    gn_grad_sums_kernel[(plan.programs,)](x3, dy3, mean, rstd, part, c, s, cg, num_groups, *_strides(x3),
                                          *_strides(dy3), *plan.split_args, plane, **common)
    part2, plane2 = part, 0
    if need_params:
        part2 = torch.empty(2, groups, plan.p2, c, dtype=mean.dtype, device=x3.device)
        plane2 = groups * plan.p2 * c
        gn_param_sums_kernel[(plan.param_programs,)](
            part, part2, c, n // groups, groups, plan.splits_s, plan.p2, plan.q2, plan.c_blocks2, plane, plane2,
            ACC=acc, BLOCK_Q=plan.block_q, BLOCK_C=plan.block_c2, num_warps=4)
    pick = lambda t: t if t is not None else mask  # noqa: E731  (never read nor written)
    grid = (plan.programs if dx3 is not None else plan.cb3,)
    gn_grad_apply_kernel[grid](
        x3, dy3, pick(dx3), pick(weight), pick(bias), mask, pick(noise), pick(noise_bias), mean, rstd, part, part2,
        pick(dmask), pick(dnoise), pick(dnoise_bias), pick(dweight), pick(dbias),
        c, s, cg, num_groups, n // groups, groups, *_strides(x3), *_strides(dy3), *_strides(gx),
        row_stride(noise), row_stride(noise_bias), *plan.split_args, plane, plan.p2, plan.cb3, plane2,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, NEED_DX=dx3 is not None, NEED_DMASK=dmask is not None,
        NEED_DNOISE=dnoise is not None, NEED_DNOISE_B=dnoise_bias is not None, NEED_DW=dweight is not None,
        NEED_DB=dbias is not None, BLOCK_M=plan.block_m, BLOCK_C3=plan.block_c3, BLOCK_P3=plan.block_p3, **common)
