"""Row-wise cosine similarity of two logit matrices (PBE's clean-image score)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import accumulator_dtype, sm_count

TILE_VALUES = 2048  # values of a and of b a program loads per step (BLOCK_N x BLOCK_K)
PROGRAMS_PER_SM = 4


@triton.jit
def row_cosine_kernel(A, B, OUT, N, K, sa0, sa1, sb0, sb1, eps, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N),)``; each program reduces BLOCK_N rows over the K columns, a
    (BLOCK_N, BLOCK_K) tile at a time into three per-row sums (a.b, |a|^2, |b|^2: registers for
    BLOCK_N values each, not a tile's): out = a.b / max(|a| |b|, eps), as
    torch.nn.functional.cosine_similarity."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rvalid = rows < N
    r64 = rows.to(tl.int64)
    dot = tl.zeros((BLOCK_N,), dtype=ACC)
    aa = tl.zeros((BLOCK_N,), dtype=ACC)
    bb = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        valid = rvalid[:, None] & (ks < K)[None, :]
        a = tl.load(A + r64[:, None] * sa0 + ks[None, :] * sa1, mask=valid, other=0.0).to(ACC)
        b = tl.load(B + r64[:, None] * sb0 + ks[None, :] * sb1, mask=valid, other=0.0).to(ACC)
        dot += tl.sum(a * b, axis=1)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    norms = tl.sqrt(aa) * tl.sqrt(bb)
    out = dot / tl.maximum(norms, eps)
    tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=rvalid)


def cosine_plan(n: int, k: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps): rows of up to 128 columns; as many rows a tile as keep about
    ``PROGRAMS_PER_SM`` programs an SM where N allows (PBE scores 2,500 to 50,000 rows of 10
    logits: at least 132 programs either way), at most ``TILE_VALUES`` values a tile; a warp
    per 256 values of the tile, 8 a thread (1 to 8 warps: at 16 a thread, sm_90 took 128-168
    registers)."""
    block_k = min(triton.next_power_of_2(max(k, 1)), 128)
    rows_per_program = triton.cdiv(n, PROGRAMS_PER_SM * sms)
    block_n = max(1, min(triton.next_power_of_2(rows_per_program), TILE_VALUES // block_k))
    warps = max(1, min(8, block_n * block_k // 256))
    return block_n, block_k, warps


def row_cosine(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    n, k = a.shape
    if n == 0:
        return
    block_n, block_k, warps = cosine_plan(n, k, sm_count(a.device))
    row_cosine_kernel[(triton.cdiv(n, block_n),)](a, b, out, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                                  float(eps), ACC=accumulator_dtype(a.dtype), BLOCK_N=block_n,
                                                  BLOCK_K=block_k, num_warps=warps)
