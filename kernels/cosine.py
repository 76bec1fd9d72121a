"""Row-wise cosine similarity of two logit matrices (PBE's clean-image score)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import accumulator_dtype


@triton.jit
def row_cosine_kernel(A, B, OUT, N, K, sa0, sa1, sb0, sb1, eps, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N),)``; each program reduces BLOCK_N rows over the K columns:
    out = a.b / max(|a| |b|, eps), as torch.nn.functional.cosine_similarity."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rvalid = rows < N
    r64 = rows.to(tl.int64)
    dot = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    aa = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    bb = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        valid = rvalid[:, None] & (ks < K)[None, :]
        a = tl.load(A + r64[:, None] * sa0 + ks[None, :] * sa1, mask=valid, other=0.0).to(ACC)
        b = tl.load(B + r64[:, None] * sb0 + ks[None, :] * sb1, mask=valid, other=0.0).to(ACC)
        dot += a * b
        aa += a * a
        bb += b * b
    norms = tl.sqrt(tl.sum(aa, axis=1)) * tl.sqrt(tl.sum(bb, axis=1))
    out = tl.sum(dot, axis=1) / tl.maximum(norms, eps)
    tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=rvalid)


def row_cosine(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    n, k = a.shape
    if n == 0:
        return
    block_k = min(triton.next_power_of_2(max(k, 1)), 128)
    block_n = max(1, min(triton.next_power_of_2(n), 4096 // block_k))
    row_cosine_kernel[(triton.cdiv(n, block_n),)](a, b, out, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                                  float(eps), ACC=accumulator_dtype(a.dtype), BLOCK_N=block_n,
                                                  BLOCK_K=block_k)
