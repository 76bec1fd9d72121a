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


@dataclass(frozen=True)
class Stage:
    name: str
    share: float
    what: str
    min_seconds: float = MIN_STAGE_S  # its share is raised to this when the time left allows


# Shares from two runs (H100 and H200, 2026-11-26): the environment about 20 s, the two test parts
# at once about 50 s, the benchmarks 20-110 s each with their torch.compile variants; at the
# default 480 s every stage then gets about what it used.
STAGES = (
    Stage("environment", 0.03, "install the checkout (pip --no-deps -e), record device, driver and versions, "
                               "measure the copy bandwidth", min_seconds=40),  # an H100 took 8 s to install
    Stage("tests", 0.15, "the gpu-marked tests and the kernel / functional / layer suites on CUDA tensors, "
                         "compiled kernels, per-test timeout"),
    Stage("sanitizer", 0.12, "compute-sanitizer memcheck and racecheck over the kernel tests"),
    Stage("bn", 0.06, "fused BatchNorm vs PyTorch composition vs torch.compile vs cuDNN, CIFAR ResNet-18 shapes, "
                      "both layouts"),
    Stage("bnplans", 0.08, "the fused BatchNorm's launch plans swept (tiles, splits, warps) against the default "
                           "and cuDNN, CIFAR ResNet-18 shapes, channels_last and NCHW"),
    Stage("anp", 0.25, "bench anp on CIFAR ResNet-18 (batch 128, 500 images), 2,000 iterations end to end, "
                       "bf16 pruned-set change"),
    Stage("pgd", 0.14, "bench pgd: PGD-10, batch 512, PreAct-ResNet-18"),
    Stage("pbe", 0.10, "bench pbe: one PBE round on a clean extra set"),
    Stage("large", 0.08, "ANP on torchvision ResNet-50 at 224 px (batch 64) and ViT-B/16, peak memory"),
    Stage("cifar", 0.10, "fidelity on CIFAR-10 (JPEG copy): a backdoored model, fast ANP and PBE, ACC / ASR"),
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
    """Seconds for the first of ``pending`` stages: its share of what is left, raised to its
    ``min_seconds`` where that leaves the others at least their shares' worth of MIN_STAGE_S."""
    total = sum(s.share for s in pending)
    seconds = left * pending[0].share / total if total > 0 else 0.0
    floor = min(pending[0].min_seconds, left - MIN_STAGE_S * (len(pending) - 1))
    return max(seconds, floor, 0.0)


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
