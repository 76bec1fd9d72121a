"""Pieces the norm kernels share (BatchNorm, LayerNorm, GroupNorm): ``@triton.jit`` helpers,
inlined into each kernel that calls them, and the launchers' small Python helpers.

**Tile layout.** A BatchNorm or GroupNorm tile keeps the contiguous axis innermost: with
``CHANNELS_INNER`` it is ``(BLOCK_R, BLOCK_C)`` rows (or positions) by channels, else
``(BLOCK_C, BLOCK_R)`` channels by positions. :func:`col`, :func:`channel_sums` and
:func:`tile_zeros` hide which one it is.

**Affine.** Batch group g of the batch uses, per channel (feature), ``scale = w * (mask + noise[g])``
and ``shift = b * (1 + noise_bias[g])`` (DESIGN.md §1): :func:`group_scale`, :func:`group_shift`,
and :func:`param_grads` for the gradients of w, b, mask and the noises.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# Tile layout
# ---------------------------------------------------------------------------------------------
@triton.jit
def col(v, CHANNELS_INNER: tl.constexpr):
    """A per-channel vector (BLOCK_C,) shaped to broadcast against a tile."""
    if CHANNELS_INNER:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def channel_sums(t, CHANNELS_INNER: tl.constexpr):
    """Per-channel sums (BLOCK_C,) of a tile (over its rows or positions)."""
    if CHANNELS_INNER:
        return tl.sum(t, axis=0)
    else:
        return tl.sum(t, axis=1)


@triton.jit
def tile_zeros(ACC: tl.constexpr, CHANNELS_INNER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A zero tile (accumulators) in the layout's shape: BLOCK_R rows or positions by BLOCK_C channels."""
    if CHANNELS_INNER:
        return tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    else:
        return tl.zeros((BLOCK_C, BLOCK_R), dtype=ACC)


# ---------------------------------------------------------------------------------------------
# The perturbed affine and its parameter gradients
# ---------------------------------------------------------------------------------------------
@triton.jit
def group_scale(W, MASK, NOISE, g, cs, cvalid, s_noise, HAS_W: tl.constexpr, HAS_NOISE: tl.constexpr,
                ACC: tl.constexpr):
    """Batch group g's scale w * (mask + noise[g]) of channels ``cs``, in ACC."""
    scale = tl.load(MASK + cs, mask=cvalid, other=0.0).to(ACC)
    if HAS_NOISE:
        scale += tl.load(NOISE + g * s_noise + cs, mask=cvalid, other=0.0).to(ACC)
    if HAS_W:
        scale *= tl.load(W + cs, mask=cvalid, other=0.0).to(ACC)
    return scale


@triton.jit
def group_shift(B, NOISE_B, g, cs, cvalid, s_noise_b, HAS_B: tl.constexpr, HAS_NOISE_B: tl.constexpr,
                ACC: tl.constexpr):
    """Batch group g's shift b * (1 + noise_bias[g]) of channels ``cs`` (zero without a bias), in ACC."""
    shift = tl.zeros(cs.shape, dtype=ACC)
    if HAS_B:
        shift = tl.load(B + cs, mask=cvalid, other=0.0).to(ACC)
        if HAS_NOISE_B:
            shift *= 1.0 + tl.load(NOISE_B + g * s_noise_b + cs, mask=cvalid, other=0.0).to(ACC)
    return shift


@triton.jit
def param_grads(W, B, MASK, NOISE, NOISE_B, PART_A, PART_B, DMASK, DNOISE, DNOISE_B, DW, DB, cs, cvalid, C, G, P,
                s_noise, s_noise_b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_NOISE: tl.constexpr,
                HAS_NOISE_B: tl.constexpr, NEED_DMASK: tl.constexpr, NEED_DNOISE: tl.constexpr,
                NEED_DNOISE_B: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
                IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-channel gradients of channels ``cs`` that are asked for: per batch group g, in
    order, A_g = sum(dy * xhat) and B_g = sum(dy) summed from the P partial rows of ``PART_A`` and
    ``PART_B`` (each (G, P, C) contiguous; row offsets computed in IDX), BLOCK_P at a time in a
    fixed order; d noise[g] = w * A_g and d noise_bias[g] = b * B_g, and, summed over the groups
    in order, d mask = w * sum A_g, d w = sum (mask + noise[g]) * A_g, d b = sum (1 + noise_bias[g]) * B_g."""
    m = tl.load(MASK + cs, mask=cvalid, other=0.0).to(ACC)
    w = tl.full((BLOCK_C,), 1.0, dtype=ACC)
    if HAS_W:
        w = tl.load(W + cs, mask=cvalid, other=0.0).to(ACC)
    b = tl.zeros((BLOCK_C,), dtype=ACC)
    if HAS_B:
        b = tl.load(B + cs, mask=cvalid, other=0.0).to(ACC)
    ps = tl.arange(0, BLOCK_P)
    sum_a = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_dw = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_db = tl.zeros((BLOCK_C,), dtype=ACC)
    for g in range(0, G):
        tile_a = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        tile_b = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            valid = ((p0 + ps) < P)[:, None] & cvalid[None, :]
            offs = (g * P + p0 + ps).to(IDX)[:, None] * C + cs[None, :]
            tile_a += tl.load(PART_A + offs, mask=valid, other=0.0).to(ACC)
            tile_b += tl.load(PART_B + offs, mask=valid, other=0.0).to(ACC)
        a = tl.sum(tile_a, axis=0)
        bb = tl.sum(tile_b, axis=0)
        factor = m
        if HAS_NOISE:
            factor += tl.load(NOISE + g * s_noise + cs, mask=cvalid, other=0.0).to(ACC)
        bias_factor = tl.full((BLOCK_C,), 1.0, dtype=ACC)
        if HAS_NOISE_B:
            bias_factor += tl.load(NOISE_B + g * s_noise_b + cs, mask=cvalid, other=0.0).to(ACC)
        if NEED_DNOISE:
            tl.store(DNOISE + g * C + cs, (w * a).to(DNOISE.dtype.element_ty), mask=cvalid)
        if NEED_DNOISE_B:
            tl.store(DNOISE_B + g * C + cs, (b * bb).to(DNOISE_B.dtype.element_ty), mask=cvalid)
        sum_a += a
        sum_dw += factor * a
        sum_db += bias_factor * bb
    if NEED_DMASK:
        tl.store(DMASK + cs, (w * sum_a).to(DMASK.dtype.element_ty), mask=cvalid)
    if NEED_DW:
        tl.store(DW + cs, sum_dw.to(DW.dtype.element_ty), mask=cvalid)
    if NEED_DB:
        tl.store(DB + cs, sum_db.to(DB.dtype.element_ty), mask=cvalid)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def pow2(n: int) -> int:
    """The power of two at or above ``n`` (at least 1)."""
    return triton.next_power_of_2(max(1, n))


def row_stride(t: torch.Tensor | None) -> int:
    """The batch-group stride of a (G, C) per-group parameter whose channels are contiguous
    (views into one flat arena are welcome); 0 when absent."""
    if t is None:
        return 0
    assert t.stride(-1) == 1 or t.shape[-1] == 1, "per-group parameters need contiguous channels"
    return t.stride(0)


def index_type(tensors) -> tl.dtype:
    """int32 offsets when every element of every tensor (and a tile past it) is within 2**30 of
    its start, else int64."""
    reach = max(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) for t in tensors)
    return tl.int32 if reach < 2**30 else tl.int64
