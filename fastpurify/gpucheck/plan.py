"""The plan of the GPU check: its stages in order, each run in its own process with its share of
the time budget, killed (with its process group: pytest workers, compute-sanitizer) when its
share is spent. A stage's share is taken of the time still left when it starts, so time a stage
did not use (or a skipped stage's) goes to the ones after it, and the whole command ends inside
its budget with what it measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..validation import InputError
from .record import COMMIT_ENV

SUMMARY_RESERVE_S = 4.0   # kept back for the summary
MIN_STAGE_S = 4.0         # a stage offered less is skipped ("budget")
KILL_GRACE_S = 3.0        # SIGTERM, then SIGKILL after this long


PER_CALL_S = 600.0         # the longest command the project's device tool runs (its README)
CALL_MARGIN_S = 20.0       # kept under PER_CALL_S: the interpreter's start, the summary's last writes


@dataclass(frozen=True)
class Stage:
    name: str
    expected_s: float  # seconds it needs on an H200 at its sizes (below); the budget is shared in proportion
    what: str
    min_seconds: float = MIN_STAGE_S  # its share is raised to this when the time left allows


# Expected seconds on an H200: run 3's stage times (commit b1fe143, bench/NOTES.md) and run 4's
# (tests, cifar), plus what each stage has gained since, estimated from run 3's step times:
# - tests: run 4 ran 660 compiled tests in 96 s; 779 today (the ReLU / residual folds, the eval norms);
# - sanitizer: 37 s over the same kernel tests, a few more of them;
# - bnplans: never run; 216 distinct kernels to compile (81 s on the 2-core CPU, sm_90), then 200 plans
#   timed at four shapes in two layouts (bench/NOTES.md: "give it two minutes");
# - anp: 95 s, + fast-unfused (~4 s), the two autotuned variants (~25 s), the bf16 end to end (~12 s);
# - pgd: 52 s, + fast-native-norms (~4 s) and the two autotuned variants (~20 s);
# - pbe: 41 s, + the two autotuned variants (~35 s) and the profiled round (~10 s);
# - cifar: run 4's 216 s for two attacks and a clean control; it sizes itself to the time it gets.
STAGES = (
    Stage("environment", 20, "install the checkout (pip --no-deps -e), record device, driver and versions, "
                             "measure the copy bandwidth", min_seconds=40),  # an H100 took 8 s to install
    Stage("tests", 120, "the gpu-marked tests and the kernel / functional / layer suites on CUDA tensors, "
                        "compiled kernels, per-test timeout"),
    Stage("sanitizer", 45, "compute-sanitizer memcheck and racecheck over the kernel tests"),
    Stage("bn", 25, "fused BatchNorm vs PyTorch composition vs torch.compile vs cuDNN, CIFAR ResNet-18 shapes, "
                    "both layouts"),
    Stage("bnplans", 120, "the fused BatchNorm's launch plans swept (tiles, splits, warps) against the default "
                          "and cuDNN, CIFAR ResNet-18 shapes, channels_last and NCHW"),
    Stage("anp", 140, "bench anp on CIFAR ResNet-18 (batch 128, 500 images), 2,000 iterations end to end, "
                      "bf16 pruned-set change"),
    Stage("pgd", 80, "bench pgd: PGD-10, batch 512, PreAct-ResNet-18"),
    Stage("pbe", 90, "bench pbe: one PBE round on a clean extra set"),
    Stage("large", 30, "ANP on torchvision ResNet-50 at 224 px (batch 64) and ViT-B/16, peak memory"),
    Stage("cifar", 250, "fidelity on CIFAR-10 (JPEG copy): a backdoored model, fast ANP and PBE, ACC / ASR"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def choose_stages(names: str | None) -> tuple[str, ...]:
    """The stages asked for (comma-separated), checked, in plan order; None: all of them."""
    if names is None:
        return STAGE_NAMES
    asked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in asked if n not in STAGE_NAMES]
    if unknown or not asked:
        raise InputError(f"unknown stage(s) {unknown or names!r}; choose from {', '.join(STAGE_NAMES)}")
    return tuple(n for n in STAGE_NAMES if n in asked)


def allotments(left: float, pending: list[Stage]) -> float:
    """Seconds for the first of ``pending`` stages: its share of what is left (in proportion to
    the stages' expected seconds), raised to its ``min_seconds`` where that leaves the others at
    least MIN_STAGE_S each."""
    total = sum(s.expected_s for s in pending)
    seconds = left * pending[0].expected_s / total if total > 0 else 0.0
    floor = min(pending[0].min_seconds, left - MIN_STAGE_S * (len(pending) - 1))
    return max(seconds, floor, 0.0)


def estimate(stages: tuple[str, ...], budget: float, runnable) -> dict:
    """What the ``stages`` that ``runnable(name)`` says can run are expected to take on an H200,
    against ``budget``: each stage's seconds, the total, how far short the budget falls (then every
    stage gets only its proportional part and the later variants of each are cut), and a split
    into commands that each fit one device call (``PER_CALL_S``) and the budget, in plan order,
    each starting with ``environment`` where it was asked for."""
    chosen = [s for s in STAGES if s.name in stages and runnable(s.name)]
    total = sum(s.expected_s for s in chosen)
    room = min(budget, PER_CALL_S - CALL_MARGIN_S) - SUMMARY_RESERVE_S
    head = [s for s in chosen if s.name == "environment"]
    calls: list[list[Stage]] = []
    for stage in chosen:
        if stage in head:
            continue
        if not calls or sum(s.expected_s for s in calls[-1]) + stage.expected_s > room:
            calls.append(list(head))
        calls[-1].append(stage)
    return {"expected": {s.name: s.expected_s for s in chosen}, "total": total, "budget": budget,
            "short_by": max(0.0, total - (budget - SUMMARY_RESERVE_S)),
            "over_one_call": budget > PER_CALL_S - CALL_MARGIN_S,
            "calls": [{"stages": [s.name for s in call], "expected": sum(s.expected_s for s in call)}
                      for call in calls]}


def describe_estimate(est: dict, dry_run: bool = False) -> list[str]:
    """The estimate as lines to print before the run (and with ``--estimate``); a dry run's says
    its figures are the GPU's."""
    parts = ", ".join(f"{name} {s:.0f}" for name, s in est["expected"].items())
    lines = [f"plan: {parts}: about {est['total']:.0f} s expected on an H200 (budget {est['budget']:.0f} s)"
             + (" (GPU figures; a dry run takes its own)" if dry_run else "")]
    if est["over_one_call"]:
        lines.append(f"note: the budget is over {PER_CALL_S - CALL_MARGIN_S:.0f} s; the project's device tool runs "
                     f"a command for at most {PER_CALL_S:.0f} s")
    if est["short_by"] > 0:
        split = "; ".join(f"STAGES={','.join(c['stages'])} (about {c['expected']:.0f} s)" for c in est["calls"])
        lines.append(f"warning: the budget is about {est['short_by']:.0f} s short: every stage gets its proportional "
                     "part and the later variants of each are cut. Raise the budget or run fewer stages"
                     + (f"; in calls that fit: {split}" if len(est["calls"]) > 1 else ""))
    return lines


def cannot_run(name: str, *, dry_run: bool, cifar: str | None) -> str | None:
    """Why a stage would only skip (checked before it is given any time), or None."""
    if name == "sanitizer":
        from .environment import sanitizer_path

        if dry_run:
            return "dry run: compute-sanitizer needs a CUDA device"
        if sanitizer_path() is None:
            return "compute-sanitizer not found on PATH or in /usr/local/cuda/bin"
    if name == "bnplans" and dry_run:
        return "dry run: the plan sweep times compiled kernels on a CUDA device"
    if name == "cifar":
        from .fidelity import unavailable

        return unavailable(cifar)
    return None


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_stage(stage: Stage, seconds: float, out_dir: Path, args: list[str], env: dict, root: Path) -> dict:
    """One stage in its own process group for at most ``seconds``; its record (the JSON it wrote,
    completed with the exit status, or a failure record when it wrote none)."""
    log_path = out_dir / "logs" / f"{stage.name}.log"
    cmd = [sys.executable, "-m", "fastpurify.gpucheck.stage", stage.name, "--out", str(out_dir),
           "--seconds", f"{max(seconds - KILL_GRACE_S - 1, 1):.1f}", *args]
    started = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
    record = _read_record(out_dir / f"{stage.name}.json", stage.name)
    record["wall_seconds"] = round(time.monotonic() - started, 2)
    record["allotted_seconds"] = round(seconds, 1)
    record["exit_code"] = proc.returncode
    if timed_out:
        record["status"] = "timed out"
        record["reason"] = f"killed after its {seconds:.0f} s; what it measured before is kept"
    elif record["status"] in ("running", "missing") or (proc.returncode != 0 and record["status"] == "ok"):
        record["status"] = "failed"
        record["reason"] = record.get("reason") or f"exit code {proc.returncode}; last lines: {_tail(log_path)}"
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_record(path: Path, name: str) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"stage": name, "status": "missing", "reason": "", "steps": []}


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-1200:]
    except OSError:
        return ""


def run_plan(out_dir: Path, *, budget: float, stages: tuple[str, ...], dry_run: bool, cifar: str | None,
             commit: str | None, results_dir: Path | None, root: Path) -> dict:
    """Run the selected stages in order inside ``budget`` seconds; write the summary and the
    combined JSON; return the combined result."""
    from .summary import write_outputs

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    commit = commit or git_commit(root)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{COMMIT_ENV: commit})
    # Compiled kernels are shared by every stage (the tests compile them, the sanitizer and the
    # benchmarks reuse them) and kept out of the evidence folder.
    env.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastpurify-gpucheck-triton-"))
    args = ["--dry-run"] if dry_run else []
    if cifar:
        args += ["--cifar", str(cifar)]
    chosen = [s for s in STAGES if s.name in stages]
    est = estimate(stages, budget, lambda name: cannot_run(name, dry_run=dry_run, cifar=cifar) is None)
    print("\n".join(describe_estimate(est, dry_run)), flush=True)
    records = []
    for i, stage in enumerate(chosen):
        left = budget - (time.monotonic() - start) - SUMMARY_RESERVE_S
        why = cannot_run(stage.name, dry_run=dry_run, cifar=cifar)
        pending = [stage] + [s for s in chosen[i + 1:] if cannot_run(s.name, dry_run=dry_run, cifar=cifar) is None]
        seconds = allotments(left, pending)
        if why:
            rec = {"stage": stage.name, "status": "skipped", "steps": [], "reason": why}
        elif seconds < MIN_STAGE_S:
            rec = {"stage": stage.name, "status": "skipped", "steps": [],
                   "reason": f"budget: {max(left, 0):.0f} s left for {len(chosen) - i} stage(s)"}
        else:
            print(f"== {stage.name}: {stage.what} ({seconds:.0f} s)", flush=True)
            rec = run_stage(stage, seconds, out_dir, args, env, root)
        rec["expected_seconds"] = stage.expected_s
        records.append(rec)
        print(f"   {stage.name}: {rec['status']} in {rec.get('wall_seconds', 0):.0f} s"
              f"{' - ' + rec['reason'] if rec.get('reason') else ''}", flush=True)
    not_chosen = [{"stage": s.name, "status": "skipped", "steps": [], "reason": "not selected (--stages)"}
                  for s in STAGES if s.name not in stages]
    _undo_fallback(records, root)
    ordered = sorted(records + not_chosen, key=lambda r: STAGE_NAMES.index(r["stage"]))
    return write_outputs(out_dir, ordered, budget=budget, dry_run=dry_run, commit=commit,
                         seconds=time.monotonic() - start, results_dir=results_dir)


def _undo_fallback(records: list[dict], root: Path) -> None:
    """Remove the import shim the environment stage made when the editable install failed."""
    for rec in records:
        link = rec.get("import_fallback_link")
        if link and Path(link).is_symlink() and Path(link).resolve() == (root / "kernels").resolve():
            Path(link).unlink()


def check_can_run(dry_run: bool) -> None:
    """A GPU check needs CUDA; without it only ``--dry-run`` runs."""
    if dry_run:
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError("the GPU check needs a CUDA device and none is available "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run with --dry-run "
                         "(make gpu-check DRY_RUN=1) to rehearse the same plan on CPU with smoke sizes")
