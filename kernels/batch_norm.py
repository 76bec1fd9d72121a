"""Masked-and-perturbed BatchNorm: one fused forward and one fused backward kernel.

The input is seen as ``(N, C, S)`` through three strides (sample, channel, spatial), which covers
2-D ``(N, C)``, contiguous NCHW and channels_last NHWC without copies. The batch holds ``G`` equal
contiguous groups of ``Ng = N / G`` samples, each normalised with its own statistics over its
``M = Ng * S`` values per channel. Group g uses ``scale = w * (mask + noise[g])`` and
``shift = b * (1 + noise_bias[g])`` (DESIGN.md §1).

Every program owns a block of ``BLOCK_C`` channels for all groups, so each reduction is a plain
loop inside one program: deterministic, no atomics. Tiles are ``(BLOCK_R, BLOCK_C)`` with
``r = n * S + s`` the flat index inside a group; the launcher picks a tall thin tile when the
spatial axis is contiguous (NCHW) and a wide one when the channel axis is (NHWC, 2-D input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import accumulator_dtype


@triton.jit
def _group_offsets(r, cs, base_n, S, sn, sc, ss):
    """Memory offsets (int64) of flat in-group rows ``r`` (BLOCK_R,) and channels ``cs`` (BLOCK_C,)."""
    n = (base_n + r // S).to(tl.int64)
    s = (r % S).to(tl.int64)
    return n[:, None] * sn + s[:, None] * ss + cs.to(tl.int64)[None, :] * sc


@triton.jit
def _channel_params(W, B, MASK, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channels, their validity, and weight, bias and mask in ACC precision."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    w = tl.load(W + cs, mask=cmask, other=0.0).to(ACC)
    b = tl.load(B + cs, mask=cmask, other=0.0).to(ACC)
    m = tl.load(MASK + cs, mask=cmask, other=0.0).to(ACC)
    return cs, cmask, w, b, m


@triton.jit
def _load_tile(PTR, r, cs, cmask, base_n, S, M, sn, sc, ss, ACC: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile of rows ``r`` of a group, zero outside the tensor, and its validity."""
    valid = (r < M)[:, None] & cmask[None, :]
    tile = tl.load(PTR + _group_offsets(r, cs, base_n, S, sn, sc, ss), mask=valid, other=0.0).to(ACC)
    return tile, valid


@triton.jit
def bn_forward_kernel(X, Y, W, B, MASK, NOISE, NOISE_B, RUN_MEAN, RUN_VAR, MEAN, RSTD,
                      C, S, Ng, sxn, sxc, sxs, syn, syc, sys_, s_noise, s_noise_b, eps, momentum,
                      G: tl.constexpr, TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                      HAS_NOISE: tl.constexpr, HAS_NOISE_B: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(cdiv(C, BLOCK_C),)``. Each program, for its channels and every group in turn:
    reduces the group's values to mean and variance (training; shifted sums around the group's
    first value, in ACC precision) or reads the running statistics (eval), saves mean and
    1/sqrt(var + eps) to ``MEAN``/``RSTD`` (G, C), writes y = (x - mean) * rstd * scale + shift,
    and, if asked, folds each group's statistics into the running ones in group order
    (unbiased variance), storing them once at the end."""
    cs, cmask, w, b, m = _channel_params(W, B, MASK, C, ACC, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    M = Ng * S
    if TRAINING:
        if UPDATE_RUNNING:
            run_mean = tl.load(RUN_MEAN + cs, mask=cmask, other=0.0).to(ACC)
            run_var = tl.load(RUN_VAR + cs, mask=cmask, other=0.0).to(ACC)
    for g in tl.static_range(G):
        base_n = g * Ng
        if TRAINING:
            first = (tl.zeros((BLOCK_C,), dtype=tl.int64) + base_n) * sxn + cs.to(tl.int64) * sxc
            pivot = tl.load(X + first, mask=cmask, other=0.0).to(ACC)
            acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
            acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
            for r0 in range(0, M, BLOCK_R):
                x, valid = _load_tile(X, r0 + rows, cs, cmask, base_n, S, M, sxn, sxc, sxs, ACC)
                d = tl.where(valid, x - pivot[None, :], 0.0)
                acc1 += d
                acc2 += d * d
            s1 = tl.sum(acc1, axis=0)
            s2 = tl.sum(acc2, axis=0)
            mean = pivot + s1 / M
            var = tl.maximum((s2 - s1 * s1 / M) / M, 0.0)
            if UPDATE_RUNNING:
                run_mean = (1.0 - momentum) * run_mean + momentum * mean
                run_var = (1.0 - momentum) * run_var + momentum * var * M / (M - 1)
        else:
            mean = tl.load(RUN_MEAN + cs, mask=cmask, other=0.0).to(ACC)
            var = tl.load(RUN_VAR + cs, mask=cmask, other=1.0).to(ACC)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + g * C + cs, mean, mask=cmask)
        tl.store(RSTD + g * C + cs, rstd, mask=cmask)
        scale = m
        if HAS_NOISE:
            scale += tl.load(NOISE + g * s_noise + cs, mask=cmask, other=0.0).to(ACC)
        scale = w * scale
        shift = b
        if HAS_NOISE_B:
            shift = b * (1.0 + tl.load(NOISE_B + g * s_noise_b + cs, mask=cmask, other=0.0).to(ACC))
        a = rstd * scale
        for r0 in range(0, M, BLOCK_R):
            r = r0 + rows
            x, valid = _load_tile(X, r, cs, cmask, base_n, S, M, sxn, sxc, sxs, ACC)
            y = (x - mean[None, :]) * a[None, :] + shift[None, :]
            tl.store(Y + _group_offsets(r, cs, base_n, S, syn, syc, sys_), y.to(Y.dtype.element_ty), mask=valid)
    if TRAINING:
        if UPDATE_RUNNING:
            tl.store(RUN_MEAN + cs, run_mean.to(RUN_MEAN.dtype.element_ty), mask=cmask)
            tl.store(RUN_VAR + cs, run_var.to(RUN_VAR.dtype.element_ty), mask=cmask)


@triton.jit
def bn_backward_kernel(X, DY, DX, W, B, MASK, NOISE, NOISE_B, MEAN, RSTD,
                       DMASK, DNOISE, DNOISE_B, DW, DB,
                       C, S, Ng, sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, s_noise, s_noise_b,
                       G: tl.constexpr, TRAINING: tl.constexpr, HAS_NOISE: tl.constexpr,
                       HAS_NOISE_B: tl.constexpr, NEED_DX: tl.constexpr, NEED_DMASK: tl.constexpr,
                       NEED_DNOISE: tl.constexpr, NEED_DNOISE_B: tl.constexpr, NEED_DW: tl.constexpr,
                       NEED_DB: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(cdiv(C, BLOCK_C),)``. Each program, for its channels and every group in turn:
    reduces Sdy = sum(dy) and Sdyx = sum(dy * xhat) over the group (xhat recomputed from x and
    the saved statistics), writes dx = scale * rstd * (dy - Sdy/M - xhat * Sdyx/M) (training) or
    scale * rstd * dy (eval), and the per-channel gradients: d noise[g] = w * Sdyx,
    d noise_bias[g] = b * Sdy, and summed over groups in order d mask = w * sum Sdyx,
    d w = sum (mask + noise[g]) * Sdyx, d b = sum (1 + noise_bias[g]) * Sdy."""
    cs, cmask, w, b, m = _channel_params(W, B, MASK, C, ACC, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    M = Ng * S
    sum_dyx = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_dw = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_db = tl.zeros((BLOCK_C,), dtype=ACC)
    for g in tl.static_range(G):
        base_n = g * Ng
        mean = tl.load(MEAN + g * C + cs, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + g * C + cs, mask=cmask, other=0.0).to(ACC)
        factor = m
        if HAS_NOISE:
            factor += tl.load(NOISE + g * s_noise + cs, mask=cmask, other=0.0).to(ACC)
        bias_factor = tl.full((BLOCK_C,), 1.0, dtype=ACC)
        if HAS_NOISE_B:
            bias_factor += tl.load(NOISE_B + g * s_noise_b + cs, mask=cmask, other=0.0).to(ACC)
        acc_dy = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        acc_dyx = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for r0 in range(0, M, BLOCK_R):
            r = r0 + rows
            x, valid = _load_tile(X, r, cs, cmask, base_n, S, M, sxn, sxc, sxs, ACC)
            dy, _ = _load_tile(DY, r, cs, cmask, base_n, S, M, sdn, sdc, sds, ACC)
            xhat = tl.where(valid, (x - mean[None, :]) * rstd[None, :], 0.0)
            acc_dy += dy
            acc_dyx += dy * xhat
        sdy = tl.sum(acc_dy, axis=0)
        sdyx = tl.sum(acc_dyx, axis=0)
        if NEED_DX:
            a = w * factor * rstd
            for r0 in range(0, M, BLOCK_R):
                r = r0 + rows
                dy, valid = _load_tile(DY, r, cs, cmask, base_n, S, M, sdn, sdc, sds, ACC)
                if TRAINING:
                    x, _ = _load_tile(X, r, cs, cmask, base_n, S, M, sxn, sxc, sxs, ACC)
                    xhat = (x - mean[None, :]) * rstd[None, :]
                    dx = a[None, :] * (dy - sdy[None, :] / M - xhat * (sdyx[None, :] / M))
                else:
                    dx = a[None, :] * dy
                tl.store(DX + _group_offsets(r, cs, base_n, S, sgn, sgc, sgs), dx.to(DX.dtype.element_ty), mask=valid)
        if NEED_DNOISE:
            tl.store(DNOISE + g * C + cs, (w * sdyx).to(DNOISE.dtype.element_ty), mask=cmask)
        if NEED_DNOISE_B:
            tl.store(DNOISE_B + g * C + cs, (b * sdy).to(DNOISE_B.dtype.element_ty), mask=cmask)
        sum_dyx += sdyx
        sum_dw += factor * sdyx
        sum_db += bias_factor * sdy
    if NEED_DMASK:
        tl.store(DMASK + cs, (w * sum_dyx).to(DMASK.dtype.element_ty), mask=cmask)
    if NEED_DW:
        tl.store(DW + cs, sum_dw.to(DW.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(DB + cs, sum_db.to(DB.dtype.element_ty), mask=cmask)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, spatial) strides of a tensor viewed as (N, C, S)."""
    return t.stride(0), t.stride(1), (t.stride(2) if t.dim() == 3 else 0)


def _row_stride(t: torch.Tensor | None) -> int:
    """The group stride of a (G, C) per-group parameter whose channels are contiguous
    (views into one flat arena are welcome); 0 when absent."""
    if t is None:
        return 0
    assert t.stride(-1) == 1 or t.shape[-1] == 1, "per-group parameters need contiguous channels"
    return t.stride(0)


def tile_shape(x: torch.Tensor, C: int, M: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): wide tiles across channels when channels are contiguous
    in memory, tall ones along the reduction otherwise; about 2048 elements a tile."""
    channels_contiguous = x.stride(1) == 1 and C > 1
    if channels_contiguous:
        block_c = min(triton.next_power_of_2(C), 64)
        block_r = max(1, min(triton.next_power_of_2(M), 2048 // block_c))
    else:
        block_c = 1
        block_r = min(triton.next_power_of_2(M), 2048)
    return block_r, block_c, 4 if block_r * block_c <= 1024 else 8


def bn_forward(x3: torch.Tensor, y3: torch.Tensor, weight, bias, mask, noise, noise_bias, running_mean,
               running_var, mean: torch.Tensor, rstd: torch.Tensor, *, groups: int, training: bool,
               update_running: bool, momentum: float, eps: float) -> None:
    """Launch the forward kernel on (N, C, S) views ``x3`` -> ``y3``; fills ``mean``/``rstd`` (G, C)
    and, if ``update_running``, the running statistics in place (exactly once)."""
    N, C = x3.shape[:2]
    S = x3.shape[2] if x3.dim() == 3 else 1
    Ng = N // groups
    block_r, block_c, warps = tile_shape(x3, C, Ng * S)
    dummy = mean
    bn_forward_kernel[(triton.cdiv(C, block_c),)](
        x3, y3, weight, bias, mask,
        noise if noise is not None else dummy, noise_bias if noise_bias is not None else dummy,
        running_mean if running_mean is not None else dummy, running_var if running_var is not None else dummy,
        mean, rstd, C, S, Ng, *_strides(x3), *_strides(y3), _row_stride(noise), _row_stride(noise_bias),
        float(eps), float(momentum),
        G=groups, TRAINING=training, UPDATE_RUNNING=update_running, HAS_NOISE=noise is not None,
        HAS_NOISE_B=noise_bias is not None, ACC=accumulator_dtype(x3.dtype),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def bn_backward(x3, dy3, dx3, weight, bias, mask, noise, noise_bias, mean, rstd, *, groups: int,
                training: bool, dmask=None, dnoise=None, dnoise_bias=None, dweight=None, dbias=None) -> None:
    """Launch the backward kernel; writes ``dx3`` (if given) and each per-channel gradient buffer
    that is given (None: not needed, no work spent on it)."""
    N, C = x3.shape[:2]
    S = x3.shape[2] if x3.dim() == 3 else 1
    Ng = N // groups
    block_r, block_c, warps = tile_shape(x3, C, Ng * S)
    dummy = mean
    pick = lambda t: t if t is not None else dummy  # noqa: E731
    bn_backward_kernel[(triton.cdiv(C, block_c),)](
        x3, dy3, pick(dx3), weight, bias, mask, pick(noise), pick(noise_bias), mean, rstd,
        pick(dmask), pick(dnoise), pick(dnoise_bias), pick(dweight), pick(dbias),
        C, S, Ng, *_strides(x3), *_strides(dy3), *_strides(dx3 if dx3 is not None else x3),
        _row_stride(noise), _row_stride(noise_bias),
        G=groups, TRAINING=training, HAS_NOISE=noise is not None, HAS_NOISE_B=noise_bias is not None,
        NEED_DX=dx3 is not None, NEED_DMASK=dmask is not None, NEED_DNOISE=dnoise is not None,
        NEED_DNOISE_B=dnoise_bias is not None, NEED_DW=dweight is not None, NEED_DB=dbias is not None,
        ACC=accumulator_dtype(x3.dtype), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
