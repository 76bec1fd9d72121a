"""Masked-and-perturbed LayerNorm: a fused forward kernel, a fused backward kernel, and a small
kernel that reduces the backward's per-program partial sums into the parameter gradients.

The input is seen as ``(N, C, S)`` through three strides (sample, feature, position), as the
BatchNorm kernels see theirs: ``nn.LayerNorm((C,))`` on ``(N, T, C)`` is S = T positions with
feature stride 1; ConvNeXt's LayerNorm2d on NCHW is S = H*W with feature stride S (1 for
channels_last); a 2-D ``(N, C)`` batch is S = 1. Every *row* ``r = n * S + s`` is normalised over
its C features. The batch holds ``G`` equal contiguous groups of ``Ng = N / G`` samples, so group
g owns the ``Rg = Ng * S`` consecutive rows from ``g * Rg``; they use ``scale = w * (mask + noise[g])``
and ``shift = b * (1 + noise_bias[g])``.

Tiles are ``(BLOCK_R, BLOCK_C)``: BLOCK_R rows of one group (no program straddles two groups) by
BLOCK_C features. When a whole row fits in one tile (``ONE_TILE``, the usual case on a GPU: up to
1024 features) each kernel reads x and dy once; otherwise it walks the features in chunks, one
sweep for the statistics and one for the outputs. Every reduction is a loop inside one program
and every partial sum has its own slot, so results are deterministic (no atomics).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .norm_common import group_scale, group_shift, param_grads
from .runtime import accumulator_dtype, interpreting

MAX_BLOCK_C = 1024  # features in one tile on a GPU: a whole row of ViT-B/L, Swin and ConvNeXt
INTERPRET_BLOCK_C = 256  # under the interpreter, so that C = 1000 walks several chunks in tests
PARAM_GRAD_FEATURES = 32  # features a program of the parameter-gradient reduction sums


@triton.jit
def _row_offsets(rows, Rg, g, S, sn, ss):
    """Offsets (int64) of feature 0 of rows ``rows`` (indices inside group g)."""
    r = g * Rg + rows
    n = (r // S).to(tl.int64)
    s = (r % S).to(tl.int64)
    return n * sn + s * ss


@triton.jit
def _load(PTR, row_off, cs, sc, valid, ACC: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile at rows ``row_off`` and features ``cs``, in ACC, zero where not valid."""
    return tl.load(PTR + row_off[:, None] + cs.to(tl.int64)[None, :] * sc, mask=valid, other=0.0).to(ACC)


@triton.jit
def ln_forward_kernel(X, Y, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD, C, S, Rg, sxn, sxc, sxs, syn, syc, sys_,
                      s_noise, s_noise_b, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr,
                      HAS_NOISE_B: tl.constexpr, ACC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Grid ``(G, cdiv(Rg, BLOCK_R))``. Each program takes BLOCK_R rows of group ``program_id(0)``
    and reduces each row to its mean and variance in ACC precision: centred two-pass sums over
    the tile held in registers (``ONE_TILE``), or sums shifted by the row's first value over
    BLOCK_C-feature chunks. It saves mean and rstd = 1/sqrt(var + eps) per row to ``MEAN``/``RSTD``
    (N * S,) and writes y = (x - mean) * rstd * w * (mask + noise[g]) + b * (1 + noise_bias[g])."""
    g = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rvalid = rows < Rg
    xrow = _row_offsets(rows, Rg, g, S, sxn, sxs)
    yrow = _row_offsets(rows, Rg, g, S, syn, sys_)
    feats = tl.arange(0, BLOCK_C)
    if ONE_TILE:
        cvalid = feats < C
        valid = rvalid[:, None] & cvalid[None, :]
        x = _load(X, xrow, feats, sxc, valid, ACC)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(valid, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        scale = group_scale(W, MASK, NOISE, g, feats, cvalid, s_noise, HAS_W, HAS_NOISE, ACC)
        shift = group_shift(B, NOISE_B, g, feats, cvalid, s_noise_b, HAS_B, HAS_NOISE_B, ACC)
        y = d * rstd[:, None] * scale[None, :] + shift[None, :]
        tl.store(Y + yrow[:, None] + feats.to(tl.int64)[None, :] * syc, y.to(Y.dtype.element_ty), mask=valid)
    else:
        pivot = tl.load(X + xrow, mask=rvalid, other=0.0).to(ACC)
        s1 = tl.zeros((BLOCK_R,), dtype=ACC)
        s2 = tl.zeros((BLOCK_R,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + feats
            valid = rvalid[:, None] & (cs < C)[None, :]
            d = tl.where(valid, _load(X, xrow, cs, sxc, valid, ACC) - pivot[:, None], 0.0)
            s1 += tl.sum(d, axis=1)
            s2 += tl.sum(d * d, axis=1)
        mean = pivot + s1 / C
        rstd = 1.0 / tl.sqrt(tl.maximum((s2 - s1 * s1 / C) / C, 0.0) + eps)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + feats
            cvalid = cs < C
            valid = rvalid[:, None] & cvalid[None, :]
            scale = group_scale(W, MASK, NOISE, g, cs, cvalid, s_noise, HAS_W, HAS_NOISE, ACC)
            shift = group_shift(B, NOISE_B, g, cs, cvalid, s_noise_b, HAS_B, HAS_NOISE_B, ACC)
            x = _load(X, xrow, cs, sxc, valid, ACC)
            y = (x - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
            tl.store(Y + yrow[:, None] + cs.to(tl.int64)[None, :] * syc, y.to(Y.dtype.element_ty), mask=valid)
    tl.store(MEAN + g * Rg + rows, mean, mask=rvalid)
    tl.store(RSTD + g * Rg + rows, rstd, mask=rvalid)


@triton.jit
def ln_backward_kernel(X, DY, DX, W, MASK, NOISE, MEAN, RSTD, PART_A, PART_B, C, S, Rg, P, blocks_per_program,
                       sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, s_noise, HAS_W: tl.constexpr,
                       HAS_NOISE: tl.constexpr, NEED_DX: tl.constexpr, NEED_SUMS: tl.constexpr, ACC: tl.constexpr,
                       ONE_TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(G, P)``. Program p of group g takes the row blocks p, p + P, p + 2P, ... of its
    group (``blocks_per_program`` of them; exactly one when not ``ONE_TILE``). For each row, with
    xhat recomputed from x and the saved statistics and dyh = dy * w * (mask + noise[g]), it
    writes dx = rstd * (dyh - mean(dyh) - xhat * mean(dyh * xhat)) (row-local sums over the
    features; one sweep per tile, or two over chunks). If ``NEED_SUMS``, per feature it sums its
    rows' dy * xhat and dy and stores them once into its own slot ``[g, p, :]`` of
    ``PART_A``/``PART_B`` (G, P, C)."""
    g = tl.program_id(0)
    pid = tl.program_id(1)
    slot = (g * P + pid).to(tl.int64) * C
    feats = tl.arange(0, BLOCK_C)
    if ONE_TILE:
        cvalid = feats < C
        scale = group_scale(W, MASK, NOISE, g, feats, cvalid, s_noise, HAS_W, HAS_NOISE, ACC)
        acc_a = tl.zeros((BLOCK_C,), dtype=ACC)
        acc_b = tl.zeros((BLOCK_C,), dtype=ACC)
        for i in range(0, blocks_per_program):
            rows = (pid + i * P) * BLOCK_R + tl.arange(0, BLOCK_R)
            rvalid = rows < Rg
            xrow = _row_offsets(rows, Rg, g, S, sxn, sxs)
            drow = _row_offsets(rows, Rg, g, S, sdn, sds)
            valid = rvalid[:, None] & cvalid[None, :]
            mean = tl.load(MEAN + g * Rg + rows, mask=rvalid, other=0.0).to(ACC)
            rstd = tl.load(RSTD + g * Rg + rows, mask=rvalid, other=0.0).to(ACC)
            xhat = tl.where(valid, (_load(X, xrow, feats, sxc, valid, ACC) - mean[:, None]) * rstd[:, None], 0.0)
            dy = _load(DY, drow, feats, sdc, valid, ACC)
            if NEED_SUMS:
                acc_a += tl.sum(dy * xhat, axis=0)
                acc_b += tl.sum(dy, axis=0)
            if NEED_DX:
                grow = _row_offsets(rows, Rg, g, S, sgn, sgs)
                dyh = dy * scale[None, :]
                c1 = tl.sum(dyh * xhat, axis=1) / C
                c2 = tl.sum(dyh, axis=1) / C
                dx = rstd[:, None] * (dyh - c2[:, None] - xhat * c1[:, None])
                tl.store(DX + grow[:, None] + feats.to(tl.int64)[None, :] * sgc, dx.to(DX.dtype.element_ty),
                         mask=valid)
        if NEED_SUMS:
            tl.store(PART_A + slot + feats, acc_a, mask=cvalid)
            tl.store(PART_B + slot + feats, acc_b, mask=cvalid)
    else:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rvalid = rows < Rg
        xrow = _row_offsets(rows, Rg, g, S, sxn, sxs)
        drow = _row_offsets(rows, Rg, g, S, sdn, sds)
        grow = _row_offsets(rows, Rg, g, S, sgn, sgs)
        mean = tl.load(MEAN + g * Rg + rows, mask=rvalid, other=0.0).to(ACC)
        rstd = tl.load(RSTD + g * Rg + rows, mask=rvalid, other=0.0).to(ACC)
        c1 = tl.zeros((BLOCK_R,), dtype=ACC)
        c2 = tl.zeros((BLOCK_R,), dtype=ACC)
        if NEED_DX:
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + feats
                cvalid = cs < C
                valid = rvalid[:, None] & cvalid[None, :]
                scale = group_scale(W, MASK, NOISE, g, cs, cvalid, s_noise, HAS_W, HAS_NOISE, ACC)
                xhat = tl.where(valid, (_load(X, xrow, cs, sxc, valid, ACC) - mean[:, None]) * rstd[:, None], 0.0)
                dyh = _load(DY, drow, cs, sdc, valid, ACC) * scale[None, :]
                c1 += tl.sum(dyh * xhat, axis=1)
                c2 += tl.sum(dyh, axis=1)
            c1 = c1 / C
            c2 = c2 / C
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + feats
            cvalid = cs < C
            valid = rvalid[:, None] & cvalid[None, :]
            xhat = tl.where(valid, (_load(X, xrow, cs, sxc, valid, ACC) - mean[:, None]) * rstd[:, None], 0.0)
            dy = _load(DY, drow, cs, sdc, valid, ACC)
            if NEED_SUMS:
                tl.store(PART_A + slot + cs, tl.sum(dy * xhat, axis=0), mask=cvalid)
                tl.store(PART_B + slot + cs, tl.sum(dy, axis=0), mask=cvalid)
            if NEED_DX:
                scale = group_scale(W, MASK, NOISE, g, cs, cvalid, s_noise, HAS_W, HAS_NOISE, ACC)
                dx = rstd[:, None] * (dy * scale[None, :] - c2[:, None] - xhat * c1[:, None])
                tl.store(DX + grow[:, None] + cs.to(tl.int64)[None, :] * sgc, dx.to(DX.dtype.element_ty), mask=valid)


@triton.jit
def ln_param_grads_kernel(PART_A, PART_B, W, B, MASK, NOISE, NOISE_B, DMASK, DNOISE, DNOISE_B, DW, DB, C, P, G,
                          s_noise, s_noise_b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr,
                          HAS_NOISE_B: tl.constexpr, NEED_DMASK: tl.constexpr, NEED_DNOISE: tl.constexpr,
                          NEED_DNOISE_B: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(cdiv(C, BLOCK_C),)``. Each program, for its features and each group g in order,
    sums the P partial slots of ``PART_A``/``PART_B`` (G, P, C) in a fixed order into
    A_g = sum(dy * xhat) and B_g = sum(dy) over the group's rows, writes d noise[g] = w * A_g and
    d noise_bias[g] = b * B_g, and, summed over the groups in order, d mask = w * sum A_g,
    d w = sum (mask + noise[g]) * A_g and d b = sum (1 + noise_bias[g]) * B_g (:func:`param_grads`,
    int64 offsets)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    param_grads(W, B, MASK, NOISE, NOISE_B, PART_A, PART_B, DMASK, DNOISE, DNOISE_B, DW, DB, cs, cs < C, C, G, P,
                s_noise, s_noise_b, HAS_W, HAS_B, HAS_NOISE, HAS_NOISE_B, NEED_DMASK, NEED_DNOISE, NEED_DNOISE_B,
                NEED_DW, NEED_DB, ACC, tl.int64, BLOCK_P, BLOCK_C)


def _row_stride(t: torch.Tensor | None) -> int:
    """The group stride of a (G, C) per-group parameter whose features are contiguous (views
    into one flat arena are welcome); 0 when absent."""
    if t is None:
        return 0
    assert t.stride(-1) == 1 or t.shape[-1] == 1, "per-group parameters need contiguous features"
    return t.stride(0)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def tile_shape(x3: torch.Tensor, rows: int, c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for ``x3`` (N, C, S) with ``rows`` rows per group. Features
    contiguous in memory (tokens, NHWC, channels_last): a whole row of up to 1024 features in one
    tile, with rows for about 4096 values. Features strided (LayerNorm2d on NCHW): 32 rows
    (contiguous positions: 128-byte runs) a tile, 16 beyond 128 features, and the features in
    chunks of up to 256, about 4096 values (compiled for sm_90: at most 128 registers at 8 warps,
    two programs an SM; tiles of 8192 values took 188-221, one program an SM). Under the interpreter one config: chunks of up to 256 features, about 16384 values."""
    rows_p2 = triton.next_power_of_2(rows)
    if interpreting():
        block_c = min(triton.next_power_of_2(c), INTERPRET_BLOCK_C)
        return max(1, min(rows_p2, 16384 // block_c)), block_c, 4
    if x3.stride(1) == 1 or c == 1:
        block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
        block_r = max(1, min(rows_p2, 4096 // block_c))
    else:
        block_r = min(rows_p2, 16 if c > 128 else 32)
        block_c = min(triton.next_power_of_2(c), 4096 // block_r, 256)
    return block_r, block_c, 4 if block_r * block_c <= 2048 else 8


def _config(x3: torch.Tensor, rows: int, c: int, tile: tuple[int, int] | None) -> tuple[int, int, int]:
    """:func:`tile_shape`, or a forced (BLOCK_R, BLOCK_C) (tests use small ones to reach every path)."""
    if tile is None:
        return tile_shape(x3, rows, c)
    return tile[0], tile[1], 4


def backward_programs(x3: torch.Tensor, groups: int, blocks: int, one_tile: bool) -> int:
    """Programs per group of the backward (P): one per row block when the features come in
    chunks; otherwise about four per SM over all groups, each looping over its blocks
    (two per group under the interpreter, so that the loop is exercised)."""
    if not one_tile:
        return blocks
    if x3.is_cuda:
        index = x3.device.index if x3.device.index is not None else torch.cuda.current_device()
        return max(1, min(blocks, triton.cdiv(4 * _sm_count(index), groups)))
    return min(blocks, 2)


def ln_forward(x3: torch.Tensor, y3: torch.Tensor, weight, bias, mask, noise, noise_bias, mean: torch.Tensor,
               rstd: torch.Tensor, *, groups: int, eps: float, tile: tuple[int, int] | None = None) -> None:
    """Launch the forward on ``x3`` (N, C, S) into ``y3`` (same shape, any strides); ``mean``
    and ``rstd`` (N * S,), in the accumulation precision, receive each row's statistics.
    ``weight``/``bias`` (C,) or None (ones/zeros), ``mask`` (C,), ``noise``/``noise_bias`` (G, C)
    with unit feature stride, or None. ``tile`` forces a (BLOCK_R, BLOCK_C)."""
    n, c, s = x3.shape
    rows = (n // groups) * s
    block_r, block_c, warps = _config(x3, rows, c, tile)
    pick = lambda t: t if t is not None else mask  # noqa: E731  (never read)
    ln_forward_kernel[(groups, triton.cdiv(rows, block_r))](
        x3, y3, pick(weight), pick(bias), mask, pick(noise), pick(noise_bias), mean, rstd,
        c, s, rows, *x3.stride(), *y3.stride(), _row_stride(noise), _row_stride(noise_bias), float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, ACC=accumulator_dtype(x3.dtype), ONE_TILE=c <= block_c,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def ln_backward(x3: torch.Tensor, dy3: torch.Tensor, dx3: torch.Tensor | None, weight, bias, mask, noise,
                noise_bias, mean: torch.Tensor, rstd: torch.Tensor, *, groups: int, dmask=None, dnoise=None,
                dnoise_bias=None, dweight=None, dbias=None, tile: tuple[int, int] | None = None) -> None:
    """Launch the backward on (N, C, S) views: writes ``dx3`` (any strides) if given, and each
    parameter gradient buffer that is given (``dmask``/``dweight``/``dbias`` (C,),
    ``dnoise``/``dnoise_bias`` (G, C) contiguous; None: not needed). The per-program partial
    sums go through a (G, P, C) buffer, reduced by a second kernel in a fixed order. ``tile``
    forces a (BLOCK_R, BLOCK_C), as in :func:`ln_forward`."""
    n, c, s = x3.shape
    rows = (n // groups) * s
    block_r, block_c, warps = _config(x3, rows, c, tile)
    one_tile = c <= block_c
    blocks = triton.cdiv(rows, block_r)
    programs = backward_programs(x3, groups, blocks, one_tile)
    acc = accumulator_dtype(x3.dtype)
    need_sums = any(t is not None for t in (dmask, dnoise, dnoise_bias, dweight, dbias))
    part_dtype = torch.float64 if x3.dtype == torch.float64 else torch.float32
    part_a = part_b = None
    if need_sums:
        part_a = torch.empty(groups, programs, c, dtype=part_dtype, device=x3.device)
        part_b = torch.empty_like(part_a)
    pick = lambda t: t if t is not None else mask  # noqa: E731  (never read nor written)
    ln_backward_kernel[(groups, programs)](
        x3, dy3, pick(dx3), pick(weight), mask, pick(noise), mean, rstd, pick(part_a), pick(part_b),
        c, s, rows, programs, triton.cdiv(blocks, programs), *x3.stride(), *dy3.stride(),
        *(dx3.stride() if dx3 is not None else x3.stride()), _row_stride(noise),
        HAS_W=weight is not None, HAS_NOISE=noise is not None, NEED_DX=dx3 is not None, NEED_SUMS=need_sums,
        ACC=acc, ONE_TILE=one_tile, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    if not need_sums:
        return
    # 32 features a program (128-byte rows of the partials): 24 programs at ViT-B's C = 768, where
    # 128 features gave 6, each reducing a sixth of the (G, P, C) partials alone
    block_pc = min(triton.next_power_of_2(c), PARAM_GRAD_FEATURES)
    ln_param_grads_kernel[(triton.cdiv(c, block_pc),)](
        part_a, part_b, pick(weight), pick(bias), mask, pick(noise), pick(noise_bias),
        pick(dmask), pick(dnoise), pick(dnoise_bias), pick(dweight), pick(dbias),
        c, programs, groups, _row_stride(noise), _row_stride(noise_bias),
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, NEED_DMASK=dmask is not None, NEED_DNOISE=dnoise is not None,
        NEED_DNOISE_B=dnoise_bias is not None, NEED_DW=dweight is not None, NEED_DB=dbias is not None, ACC=acc,
        BLOCK_P=min(triton.next_power_of_2(programs), 32), BLOCK_C=block_pc, num_warps=4)
