"""Masked-and-perturbed BatchNorm, side by side: fastpurify's fused operation against the ways
PyTorch can compute it, in one process, on one device, on the same input tensors.

Variants (what each computes on an (N, C, H, W) float32 batch of ``groups`` equal groups):

- ``fused``: :func:`fastpurify.functional.perturbed_batch_norm` (the Triton kernels on CUDA;
  fastpurify's PyTorch path on CPU, the settings say which ran);
- ``composition``: the plain PyTorch way, per group ``F.batch_norm(x_g, weight * (mask +
  noise[g]), bias * (1 + noise_bias[g]), training=True)`` then ``torch.cat``;
- ``compile``: ``torch.compile`` of that composition, one compiled callable per layout
  (``dynamic=False`` by default: specialised to each shape, as in a real network; the seconds its
  first call takes, compilation included, are recorded apart from the timings). On CPU only when
  named. A compile that fails, or that would run past the deadline, is skipped and recorded;
- ``cudnn``: PyTorch's own BatchNorm (cuDNN or ATen's kernel) in one call over the whole batch
  with an effective weight and bias that require gradients in fwd+bwd (so it computes its own
  weight and bias gradients): the floor the fused kernel must not be slower than;
- ``copy``: ``x.clone()`` (forward only): the bandwidth the kernel is held to.

Modes: ``forward`` under ``torch.no_grad()``, and ``forward+backward``: weights frozen,
``torch.autograd.grad`` of the output with a fixed random dy to x, mask, noise and noise_bias.
Bytes each must move: forward reads x and writes y (2 tensors of x's size); forward+backward
moves x, y, x again, dy and dx (5). GB/s = those bytes / the median time.

Timing: ``warmup`` untimed calls, then ``repeats`` timed calls. On CUDA each call is timed alone
with CUDA events after a ~2 ms spin (the host queues the call meanwhile) and a 256 MiB write that
flushes the L2 cache (as ``triton.testing.do_bench`` does), so it is the device time of a cold
call; on CPU the wall time of each call between synchronisations. Each row records
median/min/max milliseconds, the fused variant's speed-ups (the other variant's median / the
fused median) and a cross-check of fused against the composition (max absolute difference of y,
dx and the mask/noise gradients), so a fast but wrong kernel shows. ``deadline`` (a
``time.monotonic()`` value): no measurement starts after it; what was not measured is listed in
``skipped`` with reason ``"budget"``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import functional as FP
from ..engines.runtime import resolve_device
from ..validation import InputError, check_positive_int
from .common import Timing, choose_variants, cpu_smoke, environment, sync, timed

VARIANTS = ("fused", "composition", "compile", "cudnn", "copy")
RUN_ORDER = ("fused", "composition", "cudnn", "copy", "compile")  # the costly compile last in each row
CPU_DEFAULT_SKIP = ("compile",)
LAYOUTS = ("nchw", "nhwc")
MODES = ("forward", "forward+backward")
TENSORS_MOVED = {"forward": 2, "forward+backward": 5}
BUDGET = "budget"
SHAPES = {
    # CIFAR ResNet-18's BatchNorm shapes at ANP's batch: two groups of 128.
    "cifar_resnet18": ((256, 64, 32, 32), (256, 128, 16, 16), (256, 256, 8, 8), (256, 512, 4, 4)),
    # torchvision ResNet-50 at 224 px, batch 128 as two groups of 64.
    "resnet50": ((128, 64, 112, 112), (128, 256, 56, 56), (128, 512, 28, 28), (128, 1024, 14, 14),
                 (128, 2048, 7, 7)),
    "smoke": ((8, 16, 6, 6), (8, 8, 3, 3)),
}
FLUSH_BYTES = 256 * 2 ** 20  # > the 50 MB L2 of an H100
HOST_LEAD_CYCLES = 4_000_000  # ~2 ms of a spinning kernel at 2 GHz: time for the host to queue one call


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def parse_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """``"256x64x32x32,256x128x16x16"`` or a preset name (``cifar_resnet18``, ``resnet50``, ``smoke``)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"shapes must be like '256x64x32x32,256x128x16x16' or one of {sorted(SHAPES)}, got {text!r}")
    if text.strip() in SHAPES:
        return SHAPES[text.strip()]
    shapes = []
    for part in text.split(","):
        try:
            dims = tuple(int(d) for d in part.strip().lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 4:
            raise InputError(f"malformed shape {part.strip()!r}: give N x C x H x W as e.g. 256x64x32x32 (comma-"
                             f"separated), or one of {sorted(SHAPES)}")
        shapes.append(dims)
    return tuple(shapes)


def check_shapes(shapes, groups: int) -> tuple[tuple[int, int, int, int], ...]:
    """Each shape (N, C, H, W) of positive integers, N divisible by ``groups``, more than one value
    per channel in each group (training-mode statistics)."""
    shapes = parse_shapes(shapes) if isinstance(shapes, str) else shapes
    check_positive_int(groups, "groups")
    out = []
    for shape in shapes:
        shape = tuple(shape)
        if len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise InputError(f"each shape must be four positive integers (N, C, H, W), got {shape!r}")
        n, _, h, w = shape
        if n % groups:
            raise InputError(f"the batch size N = {n} of shape {'x'.join(map(str, shape))} is not divisible by "
                             f"groups = {groups}")
        if n // groups * h * w < 2:
            raise InputError(f"shape {'x'.join(map(str, shape))} in {groups} groups leaves one value per channel "
                             "in a group; training-mode BatchNorm needs more")
        out.append(shape)
    if not out:
        raise InputError("no shapes given")
    return tuple(out)


def _choose(values, known: Sequence[str], what: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in values.split(",")) if isinstance(values, str) else tuple(values)
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise InputError(f"unknown {what}(s) {unknown or list(values)}; choose from {list(known)}")
    return values


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------
def composition(x, weight, bias, mask, noise, noise_bias, groups: int):
    """The plain PyTorch way: one F.batch_norm per group with the masked, perturbed affine."""
    outs = [F.batch_norm(xg, None, None, weight * (mask + noise[g]), bias * (1 + noise_bias[g]), training=True)
            for g, xg in enumerate(x.chunk(groups))]
    return torch.cat(outs)


def grouped_composition(groups: int) -> Callable:
    """The composition with ``groups`` fixed (a constant to torch.compile, not a guarded input)."""
    def composed(x, weight, bias, mask, noise, noise_bias):
        return composition(x, weight, bias, mask, noise, noise_bias, groups)
    return composed


def make_inputs(shape, groups: int, layout: str, device: torch.device, seed: int = 0) -> dict:
    """Random float32 tensors from one seeded generator, none zero: x ~ 1 + 2·N(0, 1), dy ~ N(0, 1)
    (both in ``layout``), weight in [0.5, 1.5], bias in ±[0.25, 1], the mask in [0.25, 1], the
    noises U(−0.4, 0.4) as ANP draws them. x, mask, noise and noise_bias require grad; weight and
    bias are frozen."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = shape[1]

    def uniform(*size, lo, hi):
        return lo + (hi - lo) * torch.rand(*size, generator=g, device=device)

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = (1 + 2 * torch.randn(shape, generator=g, device=device)).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, device=device).contiguous(memory_format=fmt)
    sign = torch.where(torch.rand(c, generator=g, device=device) < 0.5, -1.0, 1.0)
    t = dict(x=x.requires_grad_(), dy=dy, weight=uniform(c, lo=0.5, hi=1.5), bias=sign * uniform(c, lo=0.25, hi=1.0),
             mask=uniform(c, lo=0.25, hi=1.0).requires_grad_(),
             noise=uniform(groups, c, lo=-0.4, hi=0.4).requires_grad_(),
             noise_bias=uniform(groups, c, lo=-0.4, hi=0.4).requires_grad_())
    # PyTorch's own BatchNorm: one effective affine (the mask folded in), its own leaves.
    t["weight_eff"] = (t["weight"] * t["mask"]).detach().requires_grad_()
    t["bias_eff"] = t["bias"].detach().clone().requires_grad_()
    return t


def _call(variant: str, t: dict, groups: int, compiled: Callable | None = None) -> tuple[Callable, tuple]:
    """The variant's no-argument forward and the leaves its backward differentiates."""
    args = (t["x"], t["weight"], t["bias"], t["mask"], t["noise"], t["noise_bias"])
    learned = (t["x"], t["mask"], t["noise"], t["noise_bias"])
    if variant == "fused":
        return (lambda: FP.perturbed_batch_norm(*args, groups=groups)), learned
    if variant == "composition":
        return (lambda: composition(*args, groups)), learned
    if variant == "compile":
        return (lambda: compiled(*args)), learned
    if variant == "cudnn":
        return (lambda: F.batch_norm(t["x"], None, None, t["weight_eff"], t["bias_eff"], training=True)), \
            (t["x"], t["weight_eff"], t["bias_eff"])
    return t["x"].clone, ()


def _step(forward: Callable, mode: str, wrt: tuple, dy: torch.Tensor) -> Callable:
    if mode == "forward":
        def step():
            with torch.no_grad():
                return forward()
    else:
        def step():
            return torch.autograd.grad(forward(), wrt, dy)
    return step


def cross_check(t: dict, groups: int) -> dict:
    """Max absolute difference of fused against the composition: y and every gradient."""
    wrt = (t["x"], t["mask"], t["noise"], t["noise_bias"])
    outs = {}
    for variant in ("fused", "composition"):
        forward, _ = _call(variant, t, groups)
        y = forward()
        outs[variant] = (y.detach(), *torch.autograd.grad(y, wrt, t["dy"]))
    names = ("y", "dx", "dmask", "dnoise", "dnoise_bias")
    return {name: float(f"{float((a - b).abs().max()):.3g}")
            for name, a, b in zip(names, outs["fused"], outs["composition"])}


def applies(variant: str, mode: str) -> bool:
    return variant != "copy" or mode == "forward"


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class _Runner:
    def __init__(self, device, groups, warmup, repeats, flush_cache, compile_dynamic, compile_estimate_s, deadline,
                 progress):
        self.device, self.groups, self.warmup, self.repeats = device, groups, warmup, repeats
        self.compile_dynamic, self.compile_estimate_s = compile_dynamic, compile_estimate_s
        self.deadline, self.progress = deadline, progress
        self.cuda = device.type == "cuda"
        self.flush = (torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
                      if self.cuda and flush_cache else None)
        self.compiled: dict[str, Callable] = {}  # layout -> torch.compile(composition)
        self.compile_error: str | None = None
        self.compile_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}  # per mode, in order

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    def samples_ms(self, step: Callable) -> list[float]:
        for _ in range(self.warmup):
            step()
        sync(self.device)
        if not self.cuda:
            return [timed(step, self.device)[1] * 1000 for _ in range(self.repeats)]
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            # The device spins while the host queues this call, so the events time the call's
            # kernels and never a device waiting for the host's next launch (run 2 saw single
            # calls of ~2.4 ms at shapes whose kernels take 0.03 ms).
            torch.cuda._sleep(HOST_LEAD_CYCLES)
            if self.flush is not None:
                self.flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]

    def compiled_for(self, layout: str) -> Callable:
        if layout not in self.compiled:
            # Room for every shape and mode (else dynamo falls back to eager after its recompile
            # limit and understates torch.compile), as common.compile_model does for models.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
            self.compiled[layout] = torch.compile(grouped_composition(self.groups), dynamic=self.compile_dynamic)
        return self.compiled[layout]

    def compile_first_call(self, layout: str, mode: str, t: dict) -> tuple[Callable, float]:
        """The compiled step and the seconds of its first call (compilation included)."""
        if self.compile_error:
            raise _Skip(self.compile_error)
        # The last compile of this mode (the first of a run also warms the compiler up, so it
        # overstates the rest), or the given guess before any.
        estimate = (self.compile_seconds[mode] or [self.compile_estimate_s])[-1]
        if self.deadline is not None and time.monotonic() + estimate > self.deadline:
            raise _Skip(BUDGET, f"a compile may take ~{estimate:.0f} s, "
                                f"{max(0.0, self.deadline - time.monotonic()):.0f} s left")
        try:
            forward, wrt = _call("compile", t, self.groups, self.compiled_for(layout))
            step = _step(forward, mode, wrt, t["dy"])
            _, seconds = timed(step, self.device)
        except Exception as err:  # noqa: BLE001 - a missing or broken compiler skips the variant
            self.compile_error = f"{type(err).__name__}: {str(err)[:300]}"
            raise _Skip(self.compile_error) from None
        self.compile_seconds[mode].append(seconds)
        return step, seconds

    def measure(self, variant: str, layout: str, mode: str, t: dict, nbytes: int) -> dict:
        if self.expired():
            raise _Skip(BUDGET)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        compile_seconds = None
        if variant == "compile":
            step, compile_seconds = self.compile_first_call(layout, mode, t)
            try:
                ms = self.samples_ms(step)
            except Exception as err:  # noqa: BLE001 - e.g. a recompile that fails
                raise _Skip(f"{type(err).__name__}: {str(err)[:300]}") from None
        else:
            forward, wrt = _call(variant, t, self.groups)
            ms = self.samples_ms(_step(forward, mode, wrt, t["dy"]))
        med = statistics.median(ms)
        peak = round((torch.cuda.max_memory_allocated(self.device) - before) / 2 ** 20, 1) if self.cuda else None
        timing = Timing(variant, round(med, 5), round(min(ms), 5), round(max(ms), 5), round(nbytes / 1e6 / med, 2),
                        "GB", peak, [round(m, 5) for m in ms], note=self.note(variant, compile_seconds))
        d = timing.as_dict()
        if compile_seconds is not None:
            d["compile_seconds"] = round(compile_seconds, 3)
        return d

    def note(self, variant: str, compile_seconds: float | None) -> str:
        if variant == "fused":
            return f"{FP.backend_for(torch.empty(0, device=self.device))} backend"
        if variant == "compile":
            return f"first call {compile_seconds:.1f} s (dynamic={self.compile_dynamic})"
        return {"cudnn": "one F.batch_norm over the whole batch", "copy": "x.clone()"}.get(variant, "")


def _ratio(other: dict | None, this: dict | None) -> float | None:
    """A speed-up: the other variant's median time / this one's."""
    if other is None or this is None or this["median_ms"] <= 0:
        return None
    return round(other["median_ms"] / this["median_ms"], 3)


def _row(shape, layout, mode, nbytes, timings: list[dict], check: dict | None, copy_rate: float | None) -> dict:
    """One shape, layout and mode: every variant's timing, the fused speed-ups, the check."""
    by = {d["name"]: d for d in timings}
    for d in timings:  # Timing's ratios: the composition is this benchmark's reference
        for key, base in (("ratio_vs_reference", "composition"), ("ratio_vs_compile", "compile")):
            d[key] = _ratio(by.get(base), d)
    fused = by.get("fused")
    speedup = {other: _ratio(by.get(other), fused) for other in ("composition", "compile", "cudnn")}
    return {"shape": list(shape), "layout": layout, "mode": mode, "bytes": nbytes, "variants": timings,
            "fused_speedup": speedup,
            "fused_fraction_of_copy_bandwidth": (round(fused["GB_per_second"] / copy_rate, 3)
                                                 if fused and copy_rate else None),
            "check_max_abs_diff": check}


def run_bn_benchmark(*, shapes="cifar_resnet18", groups: int = 2, layouts=LAYOUTS, modes=MODES,
                     variants: Sequence[str] | None = None, device=None, warmup: int = 5, repeats: int = 30,
                     seed: int = 0, flush_cache: bool = True, compile_dynamic: bool | None = False,
                     compile_estimate_s: float = 30.0, deadline: float | None = None, threads: int | None = None,
                     on_row: Callable[[dict, dict], None] | None = None,
                     progress: Callable[[str], None] | None = print) -> dict:
    """Time the variants on every shape, layout and mode; return the result dict (JSON-ready).

    ``shapes``: (N, C, H, W) tuples, a string ``"256x64x32x32,..."`` or a preset name of
    :data:`SHAPES` (default: CIFAR ResNet-18 at ANP's batch of 2 x 128). ``variants``: default
    every one that applies (``compile`` on CPU only when named). ``compile_dynamic``: passed to
    ``torch.compile`` (False: one specialised compile per shape and mode; True: one dynamic
    compile per layout and mode). ``compile_estimate_s``: how long a compile is assumed to take
    until one was measured, to skip it rather than run past ``deadline``. ``on_row(row, result)``
    after each row, with the result so far (to write partial JSON). On CPU the fused variant is
    fastpurify's PyTorch path (:func:`~fastpurify.benchmarks.common.cpu_smoke`) on ``threads``
    threads (default: torch's current number), both restored afterwards.
    """
    device = resolve_device(device)
    shapes = check_shapes(shapes, groups)
    layouts, modes = _choose(layouts, LAYOUTS, "layout"), _choose(modes, MODES, "mode")
    variants = choose_variants(variants, VARIANTS, device, cpu_default_skip=CPU_DEFAULT_SKIP)
    check_positive_int(repeats, "repeats")
    if threads is not None:
        check_positive_int(threads, "threads")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.cuda.device(device) if device.type == "cuda" else
                            cpu_smoke(threads=threads or torch.get_num_threads()))
        runner = _Runner(device, groups, warmup, repeats, flush_cache, compile_dynamic, compile_estimate_s,
                         deadline, progress)
        result = {"benchmark": "bn", "environment": environment(device),
                  "settings": dict(shapes=[list(s) for s in shapes], groups=groups, layouts=list(layouts),
                                   modes=list(modes), variants=list(variants), dtype="float32", warmup=warmup,
                                   repeats=repeats, seed=seed,
                                   fused_backend=FP.backend_for(torch.empty(0, device=device)),
                                   timer=("CUDA events, one call each after a spin, L2 flushed before each"
                                          if runner.flush is not None else
                                          "CUDA events, one call each after a spin" if runner.cuda else
                                          "wall clock, one call each, between synchronisations"),
                                   compile_dynamic=compile_dynamic,
                                   budget_s=None if deadline is None else round(deadline - time.monotonic(), 1),
                                   tensors_moved=TENSORS_MOVED),
                  "rows": [], "skipped": []}
        _run_rows(runner, result, shapes, layouts, modes, variants, seed, on_row)
        result["compile_seconds_total"] = round(sum(map(sum, runner.compile_seconds.values())), 3)
    return result


def _run_rows(runner: _Runner, result: dict, shapes, layouts, modes, variants, seed, on_row) -> None:
    order = [v for v in RUN_ORDER if v in variants]
    for shape in shapes:
        for layout in layouts:
            todo = [(mode, v) for mode in modes for v in order if applies(v, mode)]
            if runner.expired():
                result["skipped"] += [_skipped(v, shape, layout, mode, BUDGET) for mode, v in todo]
                continue
            runner.say(f"  {shape_name(shape)} {layout}: inputs and cross-check ...")
            t = make_inputs(shape, runner.groups, layout, runner.device, seed)
            check = cross_check(t, runner.groups)
            copy_rate = None
            for mode in modes:
                nbytes = TENSORS_MOVED[mode] * t["x"].numel() * t["x"].element_size()
                timings = []
                for variant in (v for v in order if applies(v, mode)):
                    try:
                        timings.append(runner.measure(variant, layout, mode, t, nbytes))
                    except _Skip as skip:
                        result["skipped"].append(_skipped(variant, shape, layout, mode, skip.reason, skip.detail))
                        continue
                    if variant == "copy":
                        copy_rate = timings[-1]["GB_per_second"]
                if not timings:
                    continue
                timings.sort(key=lambda d: VARIANTS.index(d["name"]))
                row = _row(shape, layout, mode, nbytes, timings, check, copy_rate)
                result["rows"].append(row)
                runner.say("    " + _progress_line(row))
                if on_row:
                    on_row(row, result)
            del t
            if runner.cuda:
                torch.cuda.empty_cache()


def _skipped(variant, shape, layout, mode, reason, detail="") -> dict:
    entry = {"name": variant, "shape": list(shape), "layout": layout, "mode": mode, "reason": reason}
    if detail:
        entry["detail"] = detail
    return entry


def _progress_line(row: dict) -> str:
    times = ", ".join(f"{d['name']} {d['median_ms']:.4f}" for d in row["variants"])
    return f"{shape_name(row['shape'])} {row['layout']} {row['mode']}: {times} ms"


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """Median ms of each variant, the fused GB/s, its speed-ups, its share of the copy's
    bandwidth and the cross-check, one line per shape, layout and mode; then what was skipped."""
    env, s = result["environment"], result["settings"]
    lines = [f"Masked-and-perturbed BatchNorm, {s['groups']} groups, float32; {env['device']} (torch {env['torch']}, "
             f"triton {env['triton']}), fused backend {s['fused_backend']}; median ms of {s['repeats']} calls "
             f"({s['timer']})",
             f"{'shape':<16} {'layout':<6} {'mode':<8} " + " ".join(f"{v:>11}" for v in VARIANTS) +
             f" {'fused GB/s':>10} {'x comp':>7} {'x compile':>9} {'x cudnn':>7} {'%copy':>6} {'|dy|':>8} {'|ddx|':>8}"]

    def num(x, fmt):
        return format("-", fmt.split(".")[0].rstrip("f")) if x is None else format(x, fmt)

    for row in result["rows"]:
        by = {d["name"]: d for d in row["variants"]}
        fused, sp, check = by.get("fused"), row["fused_speedup"], row["check_max_abs_diff"] or {}
        frac = row["fused_fraction_of_copy_bandwidth"]
        lines.append(f"{shape_name(row['shape']):<16} {row['layout']:<6} "
                     f"{'fwd' if row['mode'] == 'forward' else 'fwd+bwd':<8} " +
                     " ".join(num(by[v]["median_ms"] if v in by else None, ">11.4f") for v in VARIANTS) +
                     f" {num(fused and fused['GB_per_second'], '>10.1f')} {num(sp['composition'], '>7.2f')} "
                     f"{num(sp['compile'], '>9.2f')} {num(sp['cudnn'], '>7.2f')} "
                     f"{num(None if frac is None else 100 * frac, '>6.0f')} {num(check.get('y'), '>8.1e')} "
                     f"{num(check.get('dx') if row['mode'] != 'forward' else None, '>8.1e')}")
    compiles = [f"{shape_name(r['shape'])} {r['layout']} {r['mode']} {d['compile_seconds']:.1f}s"
                for r in result["rows"] for d in r["variants"] if "compile_seconds" in d]
    if compiles:
        lines.append(f"torch.compile first calls (compilation included): {'; '.join(compiles)}; total "
                     f"{result.get('compile_seconds_total', 0):.1f} s")
    skipped: dict[tuple, list[str]] = {}
    for e in result.get("skipped", []):
        key = (shape_name(e["shape"]), e["layout"], e["mode"], e["reason"])
        skipped.setdefault(key, []).append(e["name"])
    for (shape, layout, mode, reason), names in skipped.items():
        lines.append(f"skipped {shape} {layout} {mode}: {', '.join(names)}: {reason}")
    return "\n".join(lines)
