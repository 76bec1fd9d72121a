"""A batch drawn, augmented and written in one launch: the gather of the drawn images and labels,
ANP's random crop after zero padding and its horizontal flip, straight into the engine's batch
buffer (any strides: NCHW or channels_last, any float dtype). The random draws themselves stay
PyTorch's (``fastpurify.data.sampler``'s order), so the batch is the one ``augment_batch`` makes,
bit for bit."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def gather_augment_kernel(SRC, SRC_LABELS, INDEX, OFFSETS, FLIP_U, DST, DST_LABELS, C, H, W, padding,
                          ssn, ssc, ssh, ssw, sdn, sdc, sdh, sdw,
                          CROP: tl.constexpr, FLIP: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(B, cdiv(C * H * W, BLOCK))``; program (b, k) writes values ``k * BLOCK ...`` (in
    (c, h, w) order) of output image b: ``dst[b, c, i, j] = src[index[b], c, i + dr - padding,
    jj + dc - padding]`` (0 outside the image), with (dr, dc) = ``offsets[b]`` when ``CROP`` and
    ``jj = W - 1 - j`` where ``flip_u[b] < 0.5`` when ``FLIP``; program (b, 0) also writes
    ``dst_labels[b] = src_labels[index[b]]``."""
    b = tl.program_id(0)
    k = tl.program_id(1)
    src_n = tl.load(INDEX + b).to(tl.int64)
    offs = k * BLOCK + tl.arange(0, BLOCK)
    valid = offs < C * H * W
    plane = offs % (H * W)
    c = offs // (H * W)
    i = plane // W
    j = plane % W
    src_j = j
    if FLIP:
        u = tl.load(FLIP_U + b)
        src_j = tl.where(u < 0.5, W - 1 - j, j)
    src_i = i
    if CROP:
        src_i = i + tl.load(OFFSETS + 2 * b) - padding
        src_j = src_j + tl.load(OFFSETS + 2 * b + 1) - padding
    inside = valid & (src_i >= 0) & (src_i < H) & (src_j >= 0) & (src_j < W)
    value = tl.load(SRC + src_n * ssn + c * ssc + src_i * ssh + src_j * ssw, mask=inside, other=0.0)
    tl.store(DST + b.to(tl.int64) * sdn + c * sdc + i * sdh + j * sdw, value.to(DST.dtype.element_ty), mask=valid)
    if k == 0:
        tl.store(DST_LABELS + b, tl.load(SRC_LABELS + src_n))


def gather_augment(src: torch.Tensor, src_labels: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor | None,
                   flip_u: torch.Tensor | None, padding: int, dst: torch.Tensor, dst_labels: torch.Tensor) -> None:
    """Launch the kernel: ``src`` (N, C, H, W), ``index`` (B,) int64, ``offsets`` (B, 2) int64 or
    None (no crop), ``flip_u`` (B,) uniform draws or None (no flip), into ``dst`` (B, C, H, W) and
    ``dst_labels`` (B,)."""
    b, c, h, w = dst.shape
    if b == 0 or c * h * w == 0:
        return
    grid = (b, triton.cdiv(c * h * w, BLOCK))
    gather_augment_kernel[grid](
        src, src_labels, index.contiguous(), offsets.contiguous() if offsets is not None else index,
        flip_u.contiguous() if flip_u is not None else index, dst, dst_labels, c, h, w, int(padding),
        *src.stride(), *dst.stride(), CROP=offsets is not None, FLIP=flip_u is not None, BLOCK=BLOCK)
