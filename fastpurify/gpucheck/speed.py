"""Stages ``bn``, ``anp``, ``pgd``, ``pbe`` and ``large``: the benchmarks of ``fastpurify bench``,
side by side in one process on one device and the same data, at the issue's sizes on a GPU and at
smoke sizes in a dry run. Variants run one at a time, the cheapest first and torch.compile last
(its compile time is the least predictable), and the record is rewritten after each, so a stage
cut off at its deadline keeps every variant it finished. Ratios are recomputed over the variants
that ran.
"""

from __future__ import annotations

import contextlib
import time

from ..benchmarks.common import Timing, add_ratios
from ..benchmarks.profile import format_profile

# Per stage: the GPU sizes, then the dry-run (CPU smoke) sizes.
SIZES = {
    "bn": (dict(shapes="cifar_resnet18", compile_dynamic=True, warmup=5, repeats=30),
           dict(shapes="smoke", warmup=1, repeats=3)),
    "anp": (dict(arch="cifar_resnet18", batch_size=128, num_images=500, image_size=32, warmup=3, iterations=10,
                 repeats=5, end_to_end=2000, bf16_check=200,
                 variants=("reference", "fast"), profile=("fast", "fast-bf16"),
                 after=("fast-unfused", "reference-autotune", "fast-autotune", "reference-compile", "fast-bf16",
                        "fast-nchw", "fast-seeds4")),
            dict(arch="small_cnn", batch_size=16, num_images=32, image_size=16, warmup=1, iterations=2, repeats=2,
                 end_to_end=20, bf16_check=0, variants=("reference", "fast"), profile=("fast",),
                 after=("fast-eager",))),
    "pgd": (dict(arch="preact_resnet18", batch_size=512, num_images=2048, image_size=32, warmup=3, iterations=4,
                 repeats=5, steps=10,
                 variants=("reference", "fast", "fast-native-norms", "reference-autotune", "fast-autotune",
                           "reference-compile", "fast-bf16")),
            dict(arch="small_cnn", batch_size=8, num_images=16, image_size=16, warmup=1, iterations=1, repeats=2,
                 steps=2, variants=("reference", "fast"))),
    "pbe": (dict(arch="preact_resnet18", batch_size=128, num_images=2500, image_size=32, warmup=1, repeats=2,
                 adv_epochs=3, clean_epochs=17, profile_epochs=(1, 2),
                 variants=("reference", "fast", "fast-bf16", "reference-autotune", "fast-autotune")),
            dict(arch="small_cnn", batch_size=8, num_images=16, image_size=16, warmup=0, repeats=1, adv_epochs=1,
                 clean_epochs=1, profile_epochs=(1, 1), variants=("reference", "fast"))),
    "large": (dict(models=(("torchvision:resnet50", 224), ("torchvision:vit_b_16", 224)), batch_size=64,
                   num_images=128, warmup=2, iterations=3, repeats=3, variants=("reference", "fast")),
              dict(models=(("torchvision:resnet18", 32), ("torchvision:convnext_tiny", 32)), batch_size=2,
                   num_images=4, warmup=1, iterations=1, repeats=1, variants=("reference", "fast"))),
}
END_TO_END_PRECISIONS = ("fp32", "bf16")  # the 10 s target names no precision: both are run, fp32 first
COMPILE_NEED_S = 60  # a torch.compile variant is started only with this much time left


def sizes(stage: str, dry_run: bool) -> dict:
    return dict(SIZES[stage][1 if dry_run else 0])


@contextlib.contextmanager
def device_setup(dry_run: bool):
    """On the GPU nothing changes; a dry run times fastpurify's PyTorch path on one CPU thread."""
    if not dry_run:
        yield
        return
    from ..benchmarks.common import cpu_smoke

    with cpu_smoke():
        yield


def _need(name: str, default: float) -> float:
    return COMPILE_NEED_S if name.endswith("compile") else default


def merged(results: list[dict]) -> dict:
    """One result from per-variant runs of the same benchmark: the first run's environment and
    settings, every variant, every skip, the ratios recomputed."""
    out = dict(results[0])
    timings = [Timing(**{k: v for k, v in d.items() if not k.endswith("_per_second")},
                      per_second=next(v for k, v in d.items() if k.endswith("_per_second")),
                      unit=next(k for k in d if k.endswith("_per_second"))[:-len("_per_second")])
               for r in results for d in r["variants"]]
    add_ratios(timings)
    out["variants"] = [t.as_dict() for t in timings]
    out["skipped"] = [s for r in results for s in r.get("skipped", [])]
    checks = [r["equivalence"] for r in results if "equivalence" in r]  # PGD: each fast variant vs the reference
    if checks:
        out["equivalence"] = dict(checks[0], variants={k: v for c in checks for k, v in c["variants"].items()})
    return out


def per_variant(record, label: str, variants, run_one, *, need: float = 10.0, store=None,
                results: list | None = None) -> dict | None:
    """``run_one(variant)`` for each variant as its own step (``label variant``); after each, the
    variants so far (``results``, which a later call may go on filling) merged into one go to
    ``store`` (default: the record, under ``label``); returns that merged result."""
    store = store or (lambda merged_result: record.put(**{label: merged_result}))
    results = [] if results is None else results
    for name in variants:
        r = record.run_step(f"{label} {name}", lambda name=name: run_one(name), need=_need(name, need))
        if r is not None:
            results.append(r)
            store(merged(results))
    return merged(results) if results else None


def _median(result: dict | None, name: str) -> float | None:
    for v in (result or {}).get("variants", []):
        if v["name"] == name:
            return v["median_ms"]
    return None


def put_tables(record, table: str | None, profiles: str) -> None:
    """The stage's text: the benchmark's ``table`` and each profile recorded under ``profiles``."""
    tables = ([table] if table else []) + [format_profile(name, p) for name, p in record.data.get(profiles, {}).items()]
    if tables:
        record.put(table="\n\n".join(tables))
        print(record.data["table"])


def run_bn(record, opts) -> None:
    from ..benchmarks import batch_norm

    s = sizes("bn", opts.dry_run)
    with device_setup(opts.dry_run):
        result = record.run_step("bn kernels", lambda: batch_norm.run_bn_benchmark(
            **s, deadline=record.deadline - 2, on_row=lambda row, partial: record.put(bn=partial)), optional=False)
    record.put(bn=result, table=batch_norm.format_table(result))
    print(record.data["table"])


def run_bn_plans(record, opts) -> None:
    """The launch-plan sweep (issue 14): channels_last first, the layout whose targets are not met."""
    from ..benchmarks import bn_plans

    with device_setup(opts.dry_run):
        # a candidate compiles four kernels before it is timed: stop well before the stage's end
        result = record.run_step("bn plans", lambda: bn_plans.sweep_plans(
            "cifar_resnet18", ("nhwc", "nchw"), deadline=record.deadline - 10, progress=print,
            on_phase=lambda partial: record.put(bn_plans=partial)), optional=False)
    if result:
        record.put(bn_plans=result, table=bn_plans.format_table(result))
        print(record.data["table"])


def run_anp(record, opts) -> None:
    from ..benchmarks import anp

    s = sizes("anp", opts.dry_run)
    kw = dict(arch=s["arch"], batch_size=s["batch_size"], num_images=s["num_images"], image_size=s["image_size"],
              warmup=s["warmup"], iterations=s["iterations"], repeats=s["repeats"], progress=print)
    runs = []  # every variant's result, in the order they ran

    def run_one(v):
        return anp.run_anp_benchmark(variants=(v,), **kw)

    with device_setup(opts.dry_run):
        # The targets first: reference, fast, the end-to-end run and the bf16 check; then the
        # variants whose time is least predictable (torch.compile) or only informative.
        result = per_variant(record, "anp", s["variants"], run_one, results=runs)
        fast_ms = _median(result, "fast")
        if s["end_to_end"] and fast_ms is not None:
            for precision in END_TO_END_PRECISIONS:
                key = "anp_end_to_end" + ("" if precision == "fp32" else f"_{precision}")
                record.run_step(f"anp end to end ({precision})", lambda key=key, precision=precision: record.put(
                    **{key: end_to_end(record, s, fast_ms, precision)}), need=15)
        if s["bf16_check"] and fast_ms is not None:
            iters = s["bf16_check"]
            record.run_step("anp bf16 pruned set", lambda: record.put(anp_bf16_pruned_set=bf16_check(s, iters)),
                            need=2.5 * iters * fast_ms / 1e3 + 15)
        if fast_ms is not None:
            record.run_step("anp profile", lambda: record.put(anp_profile=anp.profile_variants(
                s["profile"], arch=s["arch"], batch_size=s["batch_size"], num_images=s["num_images"],
                image_size=s["image_size"])), need=20)
        result = per_variant(record, "anp", s["after"], run_one, results=runs) or result
    put_tables(record, anp.format_table(result) if result else None, "anp_profile")


def end_to_end(record, s: dict, fast_ms: float, precision: str = "fp32") -> dict:
    """One ``fastpurify.anp`` call of ``end_to_end`` iterations in ``precision`` (graph capture
    and checks included), shortened to what fits the stage's time when the timed fp32 iterations
    (``fast_ms``; bf16's are shorter, so its estimate errs long) say it would not; the peak memory
    and the engine's report."""
    from ..benchmarks.common import peak_memory_mb, reset_memory
    from ..engines.anp import anp as fast_anp

    fits = int((record.left() - 12) / (fast_ms / 1e3) / 1.3)
    iterations = max(1, min(s["end_to_end"], fits))
    device, model, images, labels = _subject(s)
    reset_memory(device)
    start = time.perf_counter()
    run = fast_anp(model, (images, labels), iterations=iterations, batch_size=s["batch_size"], device=device,
                   precision=precision, progress=False)
    wall = time.perf_counter() - start
    peak = peak_memory_mb(device)
    return {"precision": precision, "iterations": iterations, "asked_iterations": s["end_to_end"],
            "shortened": iterations < s["end_to_end"],
            "seconds": round(run.seconds, 3), "wall_seconds": round(wall, 3), "peak_memory_mb": peak,
            "projected_seconds_for_asked": round(run.seconds * s["end_to_end"] / iterations, 2),
            "engine": run.engine}


def _subject(s: dict):
    """The device and the benchmark's subject (model, images, labels), as ``bench anp`` builds it."""
    from ..benchmarks.common import synthetic_subject
    from ..engines.runtime import resolve_device

    device = resolve_device(None)
    return (device, *synthetic_subject(s["arch"], s["num_images"], device, image_size=s["image_size"]))


def bf16_check(s: dict, iterations: int) -> dict:
    from ..benchmarks.anp import pruned_set_change

    device, model, images, labels = _subject(s)
    return pruned_set_change(model, images, labels, batch_size=s["batch_size"], device=device, iterations=iterations)


def run_pgd(record, opts) -> None:
    from ..benchmarks import pgd

    s = sizes("pgd", opts.dry_run)
    kw = {k: s[k] for k in ("arch", "batch_size", "num_images", "image_size", "warmup", "iterations", "repeats",
                            "steps")}
    runs = []  # reference and fast first (then profiled), the torch.compile and bf16 variants after

    def run_one(v):
        return pgd.run_pgd_benchmark(variants=(v,), **kw, progress=print)

    with device_setup(opts.dry_run):
        result = per_variant(record, "pgd", s["variants"][:2], run_one, results=runs)
        if result:
            record.run_step("pgd profile", lambda: record.put(pgd_profile=pgd.profile_variants(
                s["variants"][:2], arch=s["arch"], batch_size=s["batch_size"], image_size=s["image_size"],
                steps=s["steps"])), need=15)
        result = per_variant(record, "pgd", s["variants"][2:], run_one, results=runs) or result
    put_tables(record, pgd.format_table(result) if result else None, "pgd_profile")


def run_pbe(record, opts) -> None:
    from ..benchmarks import pbe

    s = sizes("pbe", opts.dry_run)
    kw = {k: s[k] for k in ("arch", "batch_size", "num_images", "image_size", "warmup", "repeats", "adv_epochs",
                            "clean_epochs")}

    def run_one(v):
        return pbe.run_pbe_benchmark(variants=(v,), **kw, progress=print)

    with device_setup(opts.dry_run):
        result = per_variant(record, "pbe", s["variants"], run_one, need=20)
        if result:  # last: each profiled call captures its CUDA graphs under the profiler, which no other stage does
            adv, clean = s["profile_epochs"]
            record.run_step("pbe profile", lambda: record.put(pbe_profile=pbe.profile_variants(
                s["variants"][:2], arch=s["arch"], batch_size=s["batch_size"], num_images=s["num_images"],
                image_size=s["image_size"], adv_epochs=adv, clean_epochs=clean)), need=20)
    put_tables(record, pbe.format_table(result) if result else None, "pbe_profile")


def run_large(record, opts) -> None:
    from ..benchmarks import anp

    s = sizes("large", opts.dry_run)
    out, tables = {}, []
    with device_setup(opts.dry_run):
        for arch, size in s["models"]:
            kw = dict(arch=arch, image_size=size, batch_size=s["batch_size"], num_images=s["num_images"],
                      warmup=s["warmup"], iterations=s["iterations"], repeats=s["repeats"], progress=print)
            key = arch.split(":")[-1]

            def store(result, key=key):
                out[key] = result
                record.put(large=out)

            result = per_variant(record, key, s["variants"], lambda v, kw=kw: anp.run_anp_benchmark(variants=(v,), **kw),
                                 need=20, store=store)
            if result:
                tables.append(anp.format_table(result))
                record.put(table="\n\n".join(tables))
                print(tables[-1])
