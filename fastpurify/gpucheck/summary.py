"""The evidence of a GPU check: ``summary.md`` (each target, its measured value, met or not; each
stage's status and time; every failure; the benchmark tables) and one combined JSON, written into
the output folder and, when asked, to ``bench/results/gpucheck-<device>-<date>.json``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..files import write_json, write_text

BUDGET_TARGET_S = 480


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measure: Callable[[dict], tuple[str, bool | None] | None]  # stages -> (measured, met) or None


def _variant(stages: dict, stage: str, key: str, name: str) -> dict | None:
    for v in (stages.get(stage, {}).get(key) or {}).get("variants", []):
        if v["name"] == name:
            return v
    return None


def _ratio(stage: str, key: str, variant: str, field: str, goal: float):
    def measure(stages):
        v = _variant(stages, stage, key, variant)
        if v is None or v.get(field) is None:
            return None
        return f"{v[field]:.2f}x", v[field] >= goal
    return measure


def _anp_end_to_end(key: str):
    """The 2,000 iterations of one ``fastpurify.anp`` call in the precision ``key`` recorded."""
    return lambda stages: _end_to_end(stages.get("anp", {}).get(key))


def _end_to_end(e: dict | None):
    if not e:
        return None
    if e["asked_iterations"] != 2000:
        return f"{e['iterations']} iterations in {e['seconds']:.2f} s (not the 2,000 of the target)", None
    if e["shortened"]:
        return (f"{e['iterations']} iterations in {e['seconds']:.1f} s; 2,000 projected at "
                f"{e['projected_seconds_for_asked']:.0f} s (shortened to fit the stage)",
                e["projected_seconds_for_asked"] < 10)
    return f"{e['seconds']:.2f} s", e["seconds"] < 10


def _anp_pair(name: str, base: str, field: str, fmt: str, most: float):
    """Variant ``name``'s ``field`` against variant ``base``'s (one process), met at most ``most`` times it."""
    def measure(stages):
        a, b = (_variant(stages, "anp", "anp", n) for n in (name, base))
        if not a or not b or not a.get(field) or not b.get(field):
            return None
        ratio = a[field] / b[field]
        return f"{fmt.format(a[field])} vs {fmt.format(b[field])} ({ratio:.2f}x)", ratio <= most
    return measure


def _bn(other: str, goal: float):
    """The fused kernel's forward+backward speed-up over ``other`` at its worst shape and layout."""
    def measure(stages):
        rows = [r for r in (stages.get("bn", {}).get("bn") or {}).get("rows", [])
                if r.get("mode") == "forward+backward" and (r.get("fused_speedup") or {}).get(other) is not None]
        if not rows:
            return None
        speedup = lambda r: r["fused_speedup"][other]  # noqa: E731
        worst = min(rows, key=speedup)
        shape = "x".join(map(str, worst["shape"]))
        return (f"worst {speedup(worst):.2f}x ({shape} {worst['layout']}), best "
                f"{max(map(speedup, rows)):.2f}x over {len(rows)} cases", speedup(worst) >= goal)
    return measure


def _sanitizer(tool: str):
    def measure(stages):
        r = (stages.get("sanitizer", {}).get("sanitizer") or {}).get(tool)
        if not r:
            return None
        text = f"{len(r['findings'])} finding(s) in {r['ran']} test(s)"
        text += f"; {'; '.join(r['summary'])}" if r["summary"] else ""
        text += "; cut off at its deadline, before the tool's summary" if r["timed_out"] else ""
        return text, bool(r["clean"])
    return measure


def _tests(stages):
    parts = stages.get("tests", {}).get("parts") or {}
    if not parts:
        return None
    ran = sum(p["ran"] for p in parts.values())
    failed = sum(len(p["failures"]) for p in parts.values())
    counts = {}
    for p in parts.values():
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    timed_out = any(p["timed_out"] for p in parts.values())
    text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + (" (timed out)" if timed_out else "")
    return text or "none ran", failed == 0 and ran > 0 and not timed_out


def _bf16(stages):
    b = stages.get("anp", {}).get("anp_bf16_pruned_set")
    if not b:
        return None
    share = b["changed"] / max(b["num_neurons"], 1)
    return f"{b['changed']} of {b['num_neurons']} neurons ({share:.2%}) after {b['iterations']} iterations", \
        share <= 0.01


def _large(model: str):
    def measure(stages):
        r = (stages.get("large", {}).get("large") or {}).get(model)
        if not r:
            return None
        parts = [f"{v['name']} {v['median_ms']:.0f} ms/it, peak {v['peak_memory_mb'] or 0:.0f} MB"
                 for v in r["variants"]]
        fast = next((v for v in r["variants"] if v["name"] == "fast"), None)
        if fast and fast.get("ratio_vs_reference"):
            parts.append(f"{fast['ratio_vs_reference']:.2f}x")
        return "; ".join(parts), None
    return measure


PRUNED_COLUMNS = {"threshold": "threshold pruned", "clean-rule": "rule pruned", "auto": "auto pruned"}


def _acc_asr(cells: dict, method: str) -> str:
    """"ACC / ASR" of one method's cells (ASR "n/a" on the clean control), with the pruned count."""
    asr = cells.get(method + " ASR")
    text = f"{cells[method + ' ACC']['mean']:.1f} / " + ("n/a" if asr is None else f"{asr['mean']:.1f}")
    pruned = cells.get(PRUNED_COLUMNS.get(method, ""))
    return text + ("" if pruned is None else f" ({pruned['mean']:.0f} pruned)")


def _fidelity(defense: str, methods: tuple[str, ...]):
    """CIFAR-10 (JPEG copy): ACC / ASR before -> after each method, per attack (mean over seeds).
    The papers' values are not in fastpurify (see fastpurify/reproduce/papers.py), so the row is
    reported as measured, not judged."""
    def measure(stages):
        table = stages.get("cifar", {}).get(defense) or {}
        rows = table.get("rows")
        if not rows:
            return None
        parts = []
        for row in rows:
            c = row["cells"]
            after = [f"{m} {_acc_asr(c, m)}" for m in methods if m + " ACC" in c]
            parts.append(f"{row['attack']}: before {_acc_asr(c, 'before')}; " + "; ".join(after))
        runs = table.get("runs") or []
        weak = [f"{r['attack']} s{r['seed']} ASR {100 * r['before']['asr']:.1f} before"
                for r in runs if r.get("warning")]
        return (" — ".join(parts) + " (ACC / ASR %)" + _eps_readings(runs)
                + ("; the backdoor did not implant: " + ", ".join(weak) if weak else "")), None
    return measure


def _eps_readings(runs: list[dict]) -> str:
    """What ANP's eps="auto" reads from each subject (fastpurify.anp_eps), where the runs recorded it."""
    read = [f"{r['attack']} s{r['seed']} {r['anp']['eps_reading']['value']:g}" for r in runs
            if (r.get("anp") or {}).get("eps_reading")]
    return "; eps auto would read: " + ", ".join(read) if read else ""


TARGETS = (
    Target("compiled tests pass", "all", _tests),
    Target("compute-sanitizer memcheck", "clean", _sanitizer("memcheck")),
    Target("compute-sanitizer racecheck", "clean", _sanitizer("racecheck")),
    Target("fused BN fwd+bwd vs PyTorch composition", ">= 1.5x at every shape", _bn("composition", 1.5)),
    Target("fused BN fwd+bwd vs cuDNN alone", ">= 1.0x at every shape", _bn("cudnn", 1.0)),
    Target("ANP it/s vs reference", ">= 5x", _ratio("anp", "anp", "fast", "ratio_vs_reference", 5)),
    Target("ANP it/s vs reference + torch.compile", ">= 2x", _ratio("anp", "anp", "fast", "ratio_vs_compile", 2)),
    Target("ANP 2,000 iterations end to end", "< 10 s", _anp_end_to_end("anp_end_to_end")),
    Target("ANP 2,000 iterations end to end, bf16", "< 10 s", _anp_end_to_end("anp_end_to_end_bf16")),
    Target("ANP peak memory vs reference", "<= 1.5x",
           _anp_pair("fast", "reference", "peak_memory_mb", "{:.0f} MB", 1.5)),
    Target("bf16 pruned set vs fp32 (threshold 0.2)", "<= 1% of neurons", _bf16),
    Target("ANP seed ensemble K = 4 vs one seed (issue 19)", "<= 2x",
           _anp_pair("fast-seeds4", "fast", "median_ms", "{:.2f} ms/it", 2)),
    Target("PGD-10 images/s vs reference", ">= 3x", _ratio("pgd", "pgd", "fast", "ratio_vs_reference", 3)),
    Target("PGD-10 images/s vs reference + torch.compile", ">= 1.5x",
           _ratio("pgd", "pgd", "fast", "ratio_vs_compile", 1.5)),
    Target("PBE round vs reference", ">= 3x", _ratio("pbe", "pbe", "fast", "ratio_vs_reference", 3)),
    Target("ANP on ResNet-50, 224 px, batch 64", "measured, peak memory", _large("resnet50")),
    Target("ANP on ViT-B/16", "measured, peak memory", _large("vit_b_16")),
    Target("CIFAR-10 (JPEG copy): ANP, ResNet-18", "paper ACC - 2, ASR <= paper + 2 (paper values not in fastpurify)",
           _fidelity("anp", ("threshold", "clean-rule", "auto"))),
    Target("CIFAR-10 (JPEG copy): PBE", "paper ACC - 2, ASR <= paper + 2 (paper values not in fastpurify)",
           _fidelity("pbe", ("clean-set", "no-clean"))),
)


def evaluate(stages: dict, seconds: float, budget: float, dry_run: bool = False) -> list[dict]:
    """One row per target: measured value and met / not met / measured / not measured (in a dry
    run every figure is a CPU smoke figure, so nothing is judged)."""
    rows = []
    for t in TARGETS:
        try:
            got = t.measure(stages)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            got = (f"could not read: {type(err).__name__}: {err}", False)
        if got is None:
            rows.append({"target": t.name, "goal": t.goal, "measured": "not measured", "result": "not measured"})
        else:
            measured, met = got
            result = "measured" if met is None else ("met" if met else "not met")
            rows.append({"target": t.name, "goal": t.goal, "measured": measured,
                         "result": "dry run (CPU smoke figure)" if dry_run else result})
    rows.append({"target": "whole command", "goal": f"<= {BUDGET_TARGET_S} s", "measured": f"{seconds:.0f} s "
                 f"(budget {budget:.0f} s)", "result": "met" if seconds <= BUDGET_TARGET_S else "not met"})
    return rows


def _tables(stages: dict) -> list[str]:
    """The benchmark tables each stage drew (as ``fastpurify bench`` prints them), in plan order."""
    return [rec["table"] for rec in stages.values() if rec.get("table")]


def _first_line(text: str, limit: int = 240) -> str:
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    return line[:limit] + ("…" if len(line) > limit else "")


def markdown(result: dict) -> str:
    g, env = result["gpucheck"], result["environment"]
    lines = [f"# fastpurify GPU check{' (DRY RUN: CPU, smoke sizes — no GPU figure)' if g['dry_run'] else ''}", "",
             f"- device: {env.get('device', 'unknown')} ({env.get('sm_count', '?')} SMs, "
             f"{env.get('memory_gb', '?')} GB), driver {env.get('driver')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, torchvision {env.get('torchvision')}, "
             f"timm {env.get('timm')}, Python {env.get('python')}",
             f"- commit {g['commit']}, {g['date']}; {g['seconds']:.0f} s of a {g['budget']:.0f} s budget",
             f"- copy bandwidth: {(env.get('copy_bandwidth') or {}).get('gb_per_s', 'not measured')} GB/s "
             "(read + written)", "", "## Targets", "", "| target | goal | measured | result |", "|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['goal']} | {r['measured']} | {r['result']} |" for r in result["targets"]]
    lines += ["", "## Stages", "", "| stage | status | seconds | allotted | expected on an H200 | note |",
              "|---|---|---|---|---|---|"]
    for name, rec in result["stages"].items():
        expected = rec.get("expected_seconds")  # records before 2026-11-28 have none
        lines.append(f"| {name} | {rec['status']} | {rec.get('wall_seconds', rec.get('seconds', 0)):.0f} | "
                     f"{rec.get('allotted_seconds', 0):.0f} | {'-' if expected is None else f'{expected:.0f}'} | "
                     f"{rec.get('reason', '')} |")
    failures = []
    for name, rec in result["stages"].items():
        failures += [f"- {name} / {s['name']}: {s['status']} — {_first_line(s['reason'])}" for s in rec.get("steps", [])
                     if s["status"] != "ok"]
        for part, p in (rec.get("parts") or {}).items():
            failures += [f"- {name} / {part}: `{f['test']}` — {_first_line(f['message'])}" for f in p["failures"]]
        for tool, p in (rec.get("sanitizer") or {}).items():
            failures += [f"- sanitizer / {tool}: {line}" for line in p.get("findings", [])]
    if failures:
        lines += ["", "## Failures and skipped steps", "", *failures]
    tables = result.get("tables") or []
    if tables:
        lines += ["", "## Benchmark tables", ""]
        for t in tables:
            lines += ["```", t, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def environment_of(stages: dict) -> dict:
    """The environment stage's record of the machine; where that stage was cut off, the device
    and versions a benchmark stage recorded beside its figures (marked with its source)."""
    env = dict((stages.get("environment") or {}).get("environment") or {})
    if not env.get("device"):
        for rec in stages.values():
            found = next((v["environment"] for v in rec.values() if isinstance(v, dict)
                          and isinstance(v.get("environment"), dict) and v["environment"].get("device")), None)
            if found:
                env = {**found, **env, "source": f"the {rec['stage']} stage's benchmark record"}
                break
    env["copy_bandwidth"] = (stages.get("environment") or {}).get("copy_bandwidth")
    return env


def rebuild(out_dir: Path, results_dir: Path | None = None) -> dict:
    """The summary and combined JSON again from the records in ``out_dir`` (the combined JSON's
    stages where it exists, else each ``<stage>.json``), the test counts and sanitizer verdicts
    recomputed from the logs: for a run cut off before its summary, or written by an older
    version."""
    from . import pytest_log
    from .correctness import judge
    from .plan import STAGE_NAMES

    out_dir = Path(out_dir)
    combined = out_dir / "gpucheck.json"
    old = json.loads(combined.read_text()) if combined.exists() else {}
    records = []
    for name in STAGE_NAMES:
        path = out_dir / f"{name}.json"
        rec = (old.get("stages") or {}).get(name) or (json.loads(path.read_text()) if path.exists() else
                                                       {"stage": name, "status": "missing", "steps": [],
                                                        "reason": "no record in this folder"})
        for part, p in (rec.get("parts") or {}).items():
            log = out_dir / "logs" / f"pytest-{part}.jsonl"
            if log.exists():
                p.update(pytest_log.summarize(log))
        for tool, r in (rec.get("sanitizer") or {}).items():  # the verdict of this version's rules
            log = out_dir / "logs" / f"pytest-{tool}.log"
            if log.exists():
                judge(r, log.read_text(errors="replace"))
                _rejudge_step(rec, tool, r)
        records.append(rec)
    g = old.get("gpucheck") or {}
    seconds = g.get("seconds") or sum(r.get("wall_seconds", r.get("seconds", 0)) for r in records)
    commit = g.get("commit") or next((r["commit"] for r in records if r.get("commit")), "unknown")
    dry_run = g.get("dry_run", any(r.get("dry_run") for r in records))
    return write_outputs(out_dir, records, budget=g.get("budget", seconds), dry_run=dry_run,
                         commit=commit, seconds=seconds, results_dir=results_dir)


def _rejudge_step(rec: dict, name: str, r: dict) -> None:
    """A sanitizer step judged again: ok when clean with no failing test; a stage whose status
    came from its steps (partial) gets it from them again (:func:`.record.status_of`)."""
    from .record import status_of

    for step in rec.get("steps", []):
        if step["name"] == name and r["clean"] and not r.get("failures"):
            step.update(status="ok", reason="")
    if rec.get("status") == "partial":
        rec["status"] = status_of(rec["steps"])


def write_outputs(out_dir: Path, records: list[dict], *, budget: float, dry_run: bool, commit: str, seconds: float,
                  results_dir: Path | None) -> dict:
    stages = {r["stage"]: r for r in records}
    env = environment_of(stages)
    date = env.get("date") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"gpucheck": {"budget": budget, "dry_run": dry_run, "commit": commit, "seconds": round(seconds, 1),
                           "date": date},
              "environment": env, "targets": evaluate(stages, seconds, budget, dry_run), "stages": stages}
    result["tables"] = _tables(stages)
    write_json(out_dir / "gpucheck.json", result)
    write_text(out_dir / "summary.md", markdown(result))
    if results_dir is not None:
        from ..benchmarks.common import result_path

        path = result_path("gpucheck", {"device": env.get("device", "unknown"),
                                        "device_type": env.get("device_type", "cpu"),
                                        "threads": env.get("threads", 1), "date": date}, Path(results_dir))
        write_json(path, result)
        result["results_path"] = str(path)
    return result
