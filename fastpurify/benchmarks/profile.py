"""Where a benchmark step's time goes: a few steps under ``torch.profiler``, the device time of
their kernels summed by kind (fastpurify's Triton kernels, convolutions and matrix products,
PyTorch's other kernels, copies) against the wall time, and the kernels that took the most.

A step whose kernels add up to much less than its wall time leaves the device idle (the host, a
synchronisation or launches outside a CUDA graph); one whose kernels fill it is bound by them.
Kernels inside a CUDA graph's replay are traced like any other. Off CUDA only the wall time and
the operators' CPU time are recorded (the dry run's smoke check).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import torch

from .common import sync

KINDS = ("fastpurify triton", "convolution / matmul", "pytorch other", "copy / memset")
_CONV_HINTS = ("conv", "gemm", "xmma", "cutlass", "cudnn", "wgrad", "dgrad", "fprop", "implicit", "nhwc", "nchw",
               "sm90", "sm80", "cublas", "winograd")


_TRITON_FUNCTIONS = ("JITFunction", "InterpretedFunction")  # compiled; under TRITON_INTERPRET=1


def triton_kernel_names() -> frozenset[str]:
    """The names of ``fastpurify.kernels``' launched ``@triton.jit`` functions (those named
    ``*_kernel``; the rest are device helpers), empty without Triton."""
    names = set()
    for module in ("batch_norm", "group_norm", "layer_norm", "norm_common", "updates", "pgd", "cosine", "augment"):
        try:
            mod = importlib.import_module(f"fastpurify.kernels.{module}")
        except ImportError:
            continue
        names.update(name for name, value in vars(mod).items()
                     if type(value).__name__ in _TRITON_FUNCTIONS and name.endswith("_kernel"))
    return frozenset(names)


def kernel_kind(name: str, ours: frozenset[str]) -> str:
    lowered = name.lower()
    if any(n in name for n in ours):
        return KINDS[0]
    if "memcpy" in lowered or "memset" in lowered:
        return KINDS[3]
    if any(h in lowered for h in _CONV_HINTS):
        return KINDS[1]
    return KINDS[2]


# CUDA runtime / driver calls the profiler records on the host: a launch outside a CUDA graph (a
# kernel, a copy, a memset) or the launch of a whole captured graph.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync", "cudaMemsetAsync", "cuMemcpyAsync",
                "cuMemsetD")
GRAPH_CALLS = ("cudaGraphLaunch", "cuGraphLaunch")


def launch_counts(events, iterations: int) -> dict:
    """Per step, from the profiler's host events (``key`` = the call's name, ``count``): launches
    outside any CUDA graph (kernels, copies and memsets the host issued one by one) and graph
    launches (each replaying all the kernels it captured)."""
    outside = sum(e.count for e in events if e.key.startswith(LAUNCH_CALLS))
    graphs = sum(e.count for e in events if e.key.startswith(GRAPH_CALLS))
    return {"launches_outside_graphs_per_step": round(outside / iterations, 2),
            "graph_launches_per_step": round(graphs / iterations, 2)}


def profile_step(step: Callable[[], object], device: torch.device, *, iterations: int = 10, warmup: int = 2,
                 top: int = 12) -> dict:
    """``warmup`` untimed steps, then ``iterations`` under the profiler; per step: wall ms, the
    summed device time of its kernels, by kind, and the ``top`` kernels (CPU operators off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        sync(device)
        wall = time.perf_counter() - start
    per_it = 1000.0 / iterations
    ours = triton_kernel_names()
    rows = []
    for e in prof.key_averages():
        on_device = str(e.device_type).endswith("CUDA")
        if cuda != on_device:
            continue
        total_us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if total_us <= 0:
            continue
        rows.append({"name": e.key[:120], "kind": kernel_kind(e.key, ours) if cuda else "cpu operator",
                     "calls_per_step": round(e.count / iterations, 2), "ms_per_step": total_us / 1000 / iterations})
    rows.sort(key=lambda r: -r["ms_per_step"])
    out = {"iterations": iterations, "wall_ms_per_step": round(wall * per_it, 3),
           "profiled": "device kernels" if cuda else "cpu operators (self time)",
           "top": [dict(r, ms_per_step=round(r["ms_per_step"], 4)) for r in rows[:top]]}
    if cuda:
        by_kind = {k: sum(r["ms_per_step"] for r in rows if r["kind"] == k) for k in KINDS}
        busy = sum(by_kind.values())
        out.update(kernel_ms_per_step=round(busy, 3), busy_share=round(busy / out["wall_ms_per_step"], 3),
                   by_kind={k: round(v, 3) for k, v in by_kind.items()},
                   kernels_per_step=round(sum(r["calls_per_step"] for r in rows), 1),
                   **launch_counts([e for e in prof.key_averages() if not str(e.device_type).endswith("CUDA")],
                                   iterations))
    return out


def format_profile(name: str, p: dict) -> str:
    lines = [f"profile of {name}: {p['iterations']} steps, wall {p['wall_ms_per_step']:.2f} ms a step"]
    if "kernel_ms_per_step" in p:
        lines[0] += (f", kernels {p['kernel_ms_per_step']:.2f} ms ({100 * p['busy_share']:.0f} % busy), "
                     f"{p['kernels_per_step']:.0f} kernels a step")
        if "launches_outside_graphs_per_step" in p:
            lines[0] += (f"; launches outside CUDA graphs {p['launches_outside_graphs_per_step']:g} a step, "
                         f"graph launches {p['graph_launches_per_step']:g}")
        lines.append("  by kind (ms a step): " + ", ".join(f"{k} {v:.2f}" for k, v in p["by_kind"].items()))
    for r in p["top"]:
        lines.append(f"  {r['ms_per_step']:8.3f} ms  x{r['calls_per_step']:<6g} {r['kind']:<20} {r['name'][:80]}")
    return "\n".join(lines)
