"""The fused BatchNorm's launch plans, swept on the device: which tile, splits and warps are fastest
for ANP's forward+backward at each shape, against the default plan and cuDNN (issue 14).

For each shape and layout the candidates are the default plan (:func:`kernels.batch_norm.launch_plan`)
and every combination of a tile (channels_last: rows of 16-128 channels by as many rows as make
2,048 or 4,096 values; NCHW: runs of 16-1,024 positions by as many channels), the splits the plan
would give that tile, half and twice as many, and 4 or 8 warps. Each is timed as ANP's step runs it
(forward in training mode, then the backward that needs dx and the mask and noise gradients; two
groups; weights frozen) by calling the launchers with the plan forced, with the BatchNorm
benchmark's timing (:mod:`.batch_norm`: CUDA events around one call after a ~2 ms spin, L2
flushed), beside cuDNN's ``F.batch_norm`` forward+backward with an effective weight and a plain
copy of x. Every candidate's outputs are compared with the default plan's (max absolute difference
of y, dx and the per-channel gradients), so a plan that computes something else shows.

The result says, per shape: the default's and the best candidate's milliseconds and GB/s (5 tensors
moved, as the BatchNorm benchmark counts), both against cuDNN, and the best plan's parameters, to be
folded into ``launch_plan``'s rule by hand. ``deadline`` stops the sweep where the time runs out,
listing what it did not time.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch

from ..engines.runtime import resolve_device
from ..kernels.runtime import sm_count
from ..validation import InputError
from . import batch_norm as B
from .common import environment

TILE_VALUES = (2048, 4096)
CHANNEL_ROWS = (16, 32, 64, 128)  # channels a channels_last tile row spans
POSITION_RUNS = (16, 64, 256, 1024)  # positions an NCHW tile row spans
SPLIT_FACTORS = (0.5, 1.0, 2.0)
WARPS = (4, 8)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernels():
    from ..kernels import batch_norm as K
    return K


def candidates(shape, layout: str, groups: int, sms: int, itemsize: int = 4) -> list[tuple[int, dict]]:
    """``(phase, plan)`` for each plan to time at ``shape`` (N, C, H, W) in ``layout`` ("nchw" or
    "nhwc"), a plan being the launchers' ``tile``, ``splits`` and ``warps`` (``{}``: the default).
    Phases, most telling first (a sweep cut short by its deadline keeps the earlier ones for every
    shape): 0 the default; 1 each tile with the splits the plan gives it and the default warps;
    2 half and twice those splits; 3 the other warps."""
    K = _kernels()
    n, c, h, w = shape
    s = h * w
    strides = (c * s, 1, c) if layout == "nhwc" else (c * s, s, 1)
    out, seen = [(0, {})], set()
    for values in TILE_VALUES:
        if layout == "nhwc":
            tiles = [(max(1, values // bc), bc) for bc in CHANNEL_ROWS if bc <= _pow2(c)]
        else:
            tiles = [(br, min(_pow2(c), max(1, values // br))) for br in POSITION_RUNS if br <= _pow2(s)]
        for tile in tiles:
            plan = K.launch_plan((n, c, s), strides, groups, sms, itemsize, tile=tile)
            other_warps = [wp for wp in WARPS if wp != plan.warps]
            options = [(1, plan.splits, plan.warps)]
            options += [(2, max(1, round(plan.splits * f)), plan.warps) for f in SPLIT_FACTORS if f != 1.0]
            options += [(3, plan.splits, wp) for wp in other_warps]
            for phase, split, warps in options:
                if (tile, split, warps) not in seen:
                    seen.add((tile, split, warps))
                    out.append((phase, dict(tile=tile, splits=split, warps=warps)))
    return out


def _buffers(t: dict, groups: int) -> dict:
    """The (N, C, S) views and the outputs the launchers take, for the inputs of
    :func:`batch_norm.make_inputs` (either layout: H and W merge in both)."""
    x = t["x"].detach()
    n, c = x.shape[:2]
    y, dx = torch.empty_like(x), torch.empty_like(x)
    vec = lambda *size: torch.empty(*size, device=x.device)  # noqa: E731
    return dict(x3=x.view(n, c, -1), dy3=t["dy"].view(n, c, -1), y=y, dx=dx, y3=y.view(n, c, -1),
                dx3=dx.view(n, c, -1), mean=vec(groups, c), rstd=vec(groups, c), dmask=vec(c),
                dnoise=vec(groups, c), dnoise_bias=vec(groups, c))


def fused_step(t: dict, b: dict, groups: int, plan: dict) -> Callable[[], None]:
    """ANP's BatchNorm forward and backward (dx, mask, noise and noise_bias gradients) with ``plan`` forced."""
    K = _kernels()
    args = (t["weight"], t["bias"], t["mask"].detach(), t["noise"].detach(), t["noise_bias"].detach())

    def step():
        K.bn_forward(b["x3"], b["y3"], *args, None, None, b["mean"], b["rstd"], groups=groups, training=True,
                     update_running=False, momentum=0.1, eps=1e-5, **plan)
        K.bn_backward(b["x3"], b["dy3"], b["dx3"], *args, b["mean"], b["rstd"], groups=groups, training=True,
                      dmask=b["dmask"], dnoise=b["dnoise"], dnoise_bias=b["dnoise_bias"], **plan)
    return step


def _outputs(b: dict) -> tuple[torch.Tensor, ...]:
    return tuple(b[k].clone() for k in ("y", "dx", "dmask", "dnoise", "dnoise_bias"))


def _label(plan: dict) -> str:
    if not plan:
        return "default"
    (br, bc), split, warps = plan["tile"], plan["splits"], plan["warps"]
    return f"tile {br}x{bc}, splits {split}, warps {warps}"


def sweep_plans(shapes="cifar_resnet18", layouts=("nhwc",), *, groups: int = 2, device=None, warmup: int = 3,
                repeats: int = 15, deadline: float | None = None, on_phase: Callable[[dict], None] | None = None,
                progress: Callable[[str], None] | None = print, interpret: bool = False) -> dict:
    """Time every candidate plan at each shape and layout (see the module docstring), phase by
    phase over all of them (:func:`candidates`); JSON-ready. ``on_phase(result)`` after each phase
    (a caller that may be stopped keeps what was measured). ``interpret``: allow a CPU device,
    where Triton's interpreter runs the plans (tests of the sweep itself: the times mean nothing)."""
    device = resolve_device(device)
    shapes = B.check_shapes(shapes, groups)
    layouts = B._choose(layouts, B.LAYOUTS, "layout")
    if device.type != "cuda" and not interpret:
        raise InputError("the plan sweep times the compiled kernels: it needs a CUDA device (on the CPU the "
                         "interpreter runs one program after another, and no plan is faster)")
    runner = B._Runner(device, groups, warmup, repeats, True, False, 0.0, deadline, progress)
    sms = sm_count(device)
    result = dict(benchmark="bn_plans", environment=environment(device),
                  settings=dict(groups=groups, warmup=warmup, repeats=repeats, mode="forward+backward",
                                tile_values=TILE_VALUES, split_factors=SPLIT_FACTORS, warps=WARPS),
                  rows=[], skipped=[], date=time.strftime("%Y-%m-%d"))
    cases = []
    for layout, shape in itertools.product(layouts, shapes):
        t = B.make_inputs(shape, groups, layout, device)
        nbytes = B.TENSORS_MOVED["forward+backward"] * t["x"].numel() * t["x"].element_size()
        row = dict(shape=list(shape), layout=layout, groups=groups, sms=sms, candidates=[],
                   copy_gb_per_s=None)
        for variant, mode in (("cudnn", "forward+backward"), ("copy", "forward")):
            forward, wrt = B._call(variant, t, groups)
            row[variant + "_ms"] = round(statistics.median(runner.samples_ms(B._step(forward, mode, wrt, t["dy"]))), 5)
        row["copy_gb_per_s"] = round(2 * t["x"].numel() * t["x"].element_size() / 1e6 / row["copy_ms"], 1)
        result["rows"].append(row)
        cases.append((row, t, _buffers(t, groups), nbytes, candidates(shape, layout, groups, sms), []))
    for phase in range(4):
        for row, t, b, nbytes, plans, reference in cases:
            for _, plan in (p for p in plans if p[0] == phase):
                if runner.expired():
                    result["skipped"].append(dict(shape=row["shape"], layout=row["layout"], plan=_label(plan),
                                                  reason=B.BUDGET))
                    continue
                step = fused_step(t, b, groups, plan)
                ms = runner.samples_ms(step)
                step()
                outputs = _outputs(b)
                if not reference:
                    reference.extend(outputs)
                diff = max(float((a - r).abs().max()) for a, r in zip(outputs, reference))
                med = statistics.median(ms)
                row["candidates"].append(dict(plan={k: list(v) if k == "tile" else v for k, v in plan.items()},
                                              label=_label(plan), phase=phase, median_ms=round(med, 5),
                                              min_ms=round(min(ms), 5), gb_per_s=round(nbytes / 1e6 / med, 1),
                                              max_abs_diff=float(f"{diff:.3g}")))
            _summarise(row)
        if progress:
            progress(f"  phase {phase} done")
        if on_phase:
            on_phase(result)
    if progress:
        for row in result["rows"]:
            if "best" in row:
                progress(f"  {B.shape_name(row['shape'])} {row['layout']}: default {row['default']['median_ms']:.4f} "
                         f"ms, best {row['best']['median_ms']:.4f} ms ({row['best']['label']}), cuDNN "
                         f"{row['cudnn_ms']:.4f} ms")
    return result


def _summarise(row: dict) -> None:
    """The row's default and best candidates and their ratios to cuDNN and to each other."""
    done = row["candidates"]
    if not done or done[0]["label"] != "default":
        return
    best = min(done, key=lambda d: d["median_ms"])
    row.update(default=done[0], best=best, default_vs_cudnn=round(row["cudnn_ms"] / done[0]["median_ms"], 3),
               best_vs_cudnn=round(row["cudnn_ms"] / best["median_ms"], 3),
               best_vs_default=round(done[0]["median_ms"] / best["median_ms"], 3))


def format_table(result: dict) -> str:
    """One line per shape and layout: default, best, cuDNN (ms, and the ratios), the best plan."""
    lines = [f"BatchNorm launch plans, forward+backward, {result['settings']['groups']} groups, "
             f"{result['environment'].get('device', '?')}",
             f"{'shape':<18}{'layout':<7}{'default':>9}{'best':>9}{'cuDNN':>9}{'def/cuDNN':>10}{'best/cuDNN':>11}"
             f"{'GB/s':>8}{'copy GB/s':>10}  best plan (max diff)"]
    for row in result["rows"]:
        if "best" not in row:
            continue
        lines.append(f"{B.shape_name(row['shape']):<18}{row['layout']:<7}{row['default']['median_ms']:>9.4f}"
                     f"{row['best']['median_ms']:>9.4f}{row['cudnn_ms']:>9.4f}{row['default_vs_cudnn']:>10.2f}"
                     f"{row['best_vs_cudnn']:>11.2f}{row['best']['gb_per_s']:>8.0f}{row['copy_gb_per_s']:>10.0f}  "
                     f"{row['best']['label']} ({max(c['max_abs_diff'] for c in row['candidates']):.2g})")
    if result["skipped"]:
        lines.append(f"not timed (budget): {len(result['skipped'])} plan(s)")
    return "\n".join(lines)
