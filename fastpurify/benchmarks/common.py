"""What every benchmark runner shares: the record of one variant's timing, the environment stored
beside it, the timing loop (device-synchronised blocks after a warm-up), the ratios, the text
table and the default result path.

A runner builds each variant as a no-argument ``step`` and hands the names and a builder to
:func:`run_variants`; every variant runs in the same process on the same device and data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..cpu_memory import malloc_state
from ..data import synthetic_dataset
from ..models import build_model
from ..validation import InputError

REFERENCE, COMPILED = "reference", "reference-compile"
AUTOTUNED = "-autotune"  # a variant run with cuDNN autotuning: "reference-autotune", "fast-autotune"
AUTOTUNED_REFERENCE = REFERENCE + AUTOTUNED
AUTOTUNED_VARIANTS = (AUTOTUNED_REFERENCE, "fast" + AUTOTUNED)  # the benchmarks' (CUDA only)
RESULTS_DIR = Path("bench/results")


@dataclass
class Timing:
    """One variant: milliseconds per step (median, min, max over the timed blocks), steps or
    items per second (``items`` per step: images of a batch, 1 for an iteration), peak device
    memory, and the speed-ups over the reference and over the reference under torch.compile."""

    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    per_second: float
    unit: str = "iterations"
    peak_memory_mb: float | None = None
    block_ms: list[float] = field(default_factory=list)
    ratio_vs_reference: float | None = None
    ratio_vs_compile: float | None = None
    note: str = ""
    ratio_vs_autotuned_reference: float | None = None  # autotuned variants: against reference-autotune

    def as_dict(self) -> dict:
        """JSON-ready; the rate is stored as ``<unit>_per_second``."""
        d = asdict(self)
        d[f"{d.pop('unit')}_per_second"] = d.pop("per_second")
        return d


def environment(device: torch.device) -> dict:
    """Device, driver and library versions, the TF32 defaults, whether freed memory is kept
    (:mod:`fastpurify.cpu_memory`), and the date: stored with every result."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "triton": triton_version, "python": platform.python_version(), "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda, memory_gb=round(props.total_memory / 2 ** 30, 1),
                   driver=_driver_version(), tf32_defaults={"cudnn": torch.backends.cudnn.allow_tf32,
                                                            "matmul": torch.backends.cuda.matmul.allow_tf32})
    else:
        env.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    env["malloc"] = malloc_state()
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``call`` followed by a synchronisation of ``device`` (a timed call then includes its GPU work)."""
    def run() -> object:
        out = call()
        sync(device)
        return out
    return run


def reset_memory(device: torch.device) -> None:
    """Free cached blocks and restart the peak-memory counter (CUDA), before a variant is built."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` and its wall time in seconds, with a device synchronisation before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def time_variant(name: str, step: Callable[[], object], device: torch.device, *, warmup: int, iterations: int,
                 repeats: int, items: int = 1, unit: str = "iterations", note: str = "") -> Timing:
    """``warmup`` untimed steps (compilation, graph capture, autotuning), then ``repeats`` blocks
    of ``iterations`` steps, each block between two device synchronisations."""
    for _ in range(warmup):
        step()
    sync(device)
    blocks = []
    for _ in range(repeats):
        _, seconds = timed(lambda: [step() for _ in range(iterations)], device)
        blocks.append(seconds / iterations * 1000)
    return _timing(name, blocks, items, unit, peak_memory_mb(device), note)


def time_interleaved(steps: dict[str, tuple[Callable[[], object], str]], device: torch.device, *, warmup: int,
                     iterations: int, repeats: int, items: int = 1, unit: str = "iterations") -> list[Timing]:
    """Every variant's ``(step, note)`` warmed up, then timed in interleaved blocks: repeat r times
    one block of ``iterations`` steps of each variant in turn (the order reversed every other
    repeat), so that a machine whose speed drifts (a shared CPU, clocks) slows every variant alike.
    No peak memory (every variant is alive at once)."""
    for step, _ in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    blocks: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            step = steps[name][0]
            _, seconds = timed(lambda: [step() for _ in range(iterations)], device)
            blocks[name].append(seconds / iterations * 1000)
    timings = [_timing(name, blocks[name], items, unit, None, note + (" " if note else "") + "interleaved")
               for name, (_, note) in steps.items()]
    add_ratios(timings)
    return timings


def _timing(name: str, blocks: list[float], items: int, unit: str, peak: float | None, note: str) -> Timing:
    med = statistics.median(blocks)
    return Timing(name, round(med, 4), round(min(blocks), 4), round(max(blocks), 4), round(items * 1000 / med, 3),
                  unit, peak, [round(b, 4) for b in blocks], note=note)


def choose_variants(variants: Sequence[str] | None, known: Sequence[str], device: torch.device, *,
                    cuda_only: Iterable[str] = (), cpu_default_skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The variants asked for (checked), or by default every known one that applies to the device:
    ``cuda_only`` never run on CPU; ``cpu_default_skip`` only when named on CPU."""
    cuda_only, skip = set(cuda_only), set(cpu_default_skip) | set(cuda_only)
    if variants is None:
        return tuple(v for v in known if device.type == "cuda" or v not in skip)
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise InputError(f"unknown benchmark variant(s) {unknown}; choose from {list(known)}")
    if device.type != "cuda":
        cuda_named = [v for v in variants if v in cuda_only]
        if cuda_named:
            raise InputError(f"variant(s) {cuda_named} need a CUDA device; this run is on {device}")
    return tuple(variants)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` with room for every shape and mode the benchmark sends through it
    (else dynamo would silently fall back to eager after its default recompile limit)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
    return torch.compile(model)


def synthetic_subject(arch: str, num_images: int, device: torch.device, *, num_classes: int = 10, channels: int = 3,
                      image_size: int = 32, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A freshly initialised model (on the CPU; each variant copies it) and synthetic images and
    labels on ``device``: the speed of a benchmark does not depend on the weights or pixels."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes, in_channels=channels)
    images, labels = synthetic_dataset(n=num_images, num_classes=num_classes, channels=channels, size=image_size,
                                       seed=seed)
    return model, images.to(device), labels.to(device)


def run_variants(names: Sequence[str], measure: Callable[[str], Timing], device: torch.device, *,
                 progress: Callable[[str], None] | None = print,
                 optional: Iterable[str] = (COMPILED,)) -> tuple[list[Timing], list[dict]]:
    """``measure(name)`` for each variant in turn, peak memory counted per variant. A variant in
    ``optional`` that fails (torch.compile without a working compiler, say) is skipped and
    recorded with the error instead of ending the run. An autotuned variant (``<name>-autotune``,
    :func:`in_autotune_thread`) is measured in a thread of its own; ``measure`` builds it as
    :func:`untuned` of its name."""
    def one(name: str) -> Timing:
        reset_memory(device)
        if not autotuned(name):
            return measure(name)
        timing = in_autotune_thread(lambda: measure(name), device)
        timing.note = "cuDNN autotuned" + (f", {timing.note}" if timing.note else "")
        return timing

    done, skipped = build_variants(names, one, progress=progress, optional=optional)
    timings = list(done.values())
    add_ratios(timings)
    return timings, skipped


def build_variants(names: Sequence[str], build: Callable[[str], object], *,
                   progress: Callable[[str], None] | None = print,
                   optional: Iterable[str] = (COMPILED,)) -> tuple[dict[str, object], list[dict]]:
    """``build(name)`` for each variant in turn (its step, to be timed later, or its timing), by
    name; a variant in ``optional`` whose ``build`` fails is skipped and recorded with the error."""
    built, skipped = {}, []
    for name in names:
        if progress:
            progress(f"  {name} ...")
        try:
            built[name] = build(name)
        except Exception as err:  # noqa: BLE001 - only for the optional variants, re-raised otherwise
            if name not in optional:
                raise
            skipped.append({"name": name, "reason": f"{type(err).__name__}: {str(err)[:300]}"})
            if progress:
                progress(f"    skipped: {skipped[-1]['reason']}")
    return built, skipped


def add_ratios(timings: list[Timing]) -> None:
    """Speed-ups (median time of the baseline / median time of the variant); the autotuned
    variants also against the autotuned reference."""
    by_name = {t.name: t for t in timings}
    for t in timings:
        if REFERENCE in by_name:
            t.ratio_vs_reference = round(by_name[REFERENCE].median_ms / t.median_ms, 3)
        if COMPILED in by_name:
            t.ratio_vs_compile = round(by_name[COMPILED].median_ms / t.median_ms, 3)
        if AUTOTUNED_REFERENCE in by_name and autotuned(t.name):
            t.ratio_vs_autotuned_reference = round(by_name[AUTOTUNED_REFERENCE].median_ms / t.median_ms, 3)


def autotuned(name: str) -> bool:
    """Whether the variant runs with cuDNN autotuning (its name ends in ``-autotune``)."""
    return name.endswith(AUTOTUNED)


def untuned(name: str) -> str:
    """The variant an autotuned one times (``fast-autotune``: ``fast``); other names unchanged."""
    return name[:-len(AUTOTUNED)] if autotuned(name) else name


def check_interleavable(variants: Sequence[str]) -> None:
    """Interleaved blocks run every variant in the calling thread: refuse the autotuned ones."""
    tuned = [v for v in variants if autotuned(v)]
    if tuned:
        raise InputError(f"variant(s) {tuned} run in a thread of their own (cuDNN keeps its plans per thread) "
                         f"and cannot be timed in interleaved blocks; time them without interleaving")


@contextlib.contextmanager
def cudnn_autotuning() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on while the block runs, the previous value after."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def in_autotune_thread(call: Callable[[], object], device: torch.device) -> object:
    """``call()`` with cuDNN autotuning on, in a new thread; its result, or its exception re-raised.

    PyTorch caches the cuDNN plan of each convolution per thread, keyed by the shapes, layout,
    dtype and TF32 flag but not by ``torch.backends.cudnn.benchmark`` (ATen's ``Conv_v8.cpp``:
    a thread-local ``benchmark_cache``, looked up before the flag is read). In the thread that
    timed the default variants the flag would therefore change nothing for shapes already seen,
    and an autotuned variant timed first would hand its plans to the default ones. A new thread
    starts with an empty cache, so every convolution of ``call`` is autotuned and the calling
    thread's plans stay the heuristics' (the flag is global, so nothing else may run meanwhile:
    the caller waits)."""
    out: dict[str, object] = {}
    # the caller's CUDA device, by index (a new thread starts on device 0; set_device wants an index)
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" \
        else None

    def run() -> None:
        try:
            if index is not None:
                torch.cuda.set_device(index)
            with cudnn_autotuning():
                out["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            out["error"] = err

    thread = threading.Thread(target=run, name="fastpurify-cudnn-autotune")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def table(rows: Sequence[dict], *, rate_key: str, time_header: str = "ms/it", rate_header: str = "it/s",
          scale: float = 1.0) -> list[str]:
    """Lines of a text table of variant dicts (:meth:`Timing.as_dict`): the median, min and max
    time (times ``scale``), the rate, the ratios and the peak memory (an autotuned variant's ratio
    to the autotuned reference in its note)."""
    def cell(x, fmt):
        return format("-", fmt.split(".")[0]) if x is None else format(x, fmt)

    lines = [f"{'variant':<18} {time_header:>9} {'min':>9} {'max':>9} {rate_header:>9} {'x ref':>7} "
             f"{'x compile':>9} {'peak MB':>9}  note"]
    for v in rows:
        note = v["note"]
        if v.get("ratio_vs_autotuned_reference") is not None:
            note += f"; {v['ratio_vs_autotuned_reference']:.2f}x {AUTOTUNED_REFERENCE}"
        lines.append(f"{v['name']:<18} {v['median_ms'] * scale:>9.2f} {v['min_ms'] * scale:>9.2f} "
                     f"{v['max_ms'] * scale:>9.2f} {v[rate_key]:>9.2f} {cell(v['ratio_vs_reference'], '>7.2f')} "
                     f"{cell(v['ratio_vs_compile'], '>9.2f')} {cell(v['peak_memory_mb'], '>9.1f')}  {note}")
    return lines


def skipped_lines(result: dict) -> list[str]:
    return [f"{s['name']:<18} skipped: {s['reason']}" for s in result.get("skipped", [])]


def device_slug(env: dict) -> str:
    """The device part of a result's file name: the GPU's name, or ``cpu-<N>threads``."""
    text = env["device"] if env.get("device_type") == "cuda" else f"cpu-{env.get('threads', 1)}threads"
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "device"


def result_path(what: str, env: dict, directory: Path = RESULTS_DIR) -> Path:
    """``bench/results/<what>-<device>-<date>.json``."""
    return directory / f"{what}-{device_slug(env)}-{env['date'][:10]}.json"


@contextlib.contextmanager
def cpu_smoke(threads: int = 1) -> Iterator[None]:
    """For the CPU smoke runs of the benchmark suites: fastpurify's PyTorch path (the tests'
    ``TRITON_INTERPRET=1`` would time the Triton interpreter instead) on ``threads`` threads (on a
    shared 2-core machine a second spinning thread can cost 100x); both restored afterwards."""
    saved_backend, saved_threads = os.environ.get("FASTPURIFY_BACKEND"), torch.get_num_threads()
    os.environ["FASTPURIFY_BACKEND"] = "torch"
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        if saved_backend is None:
            os.environ.pop("FASTPURIFY_BACKEND", None)
        else:
            os.environ["FASTPURIFY_BACKEND"] = saved_backend
