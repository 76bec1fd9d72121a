"""Stages ``tests`` and ``sanitizer``: the project's own tests, compiled on the GPU.

``tests`` runs (1) every ``gpu``-marked test and (2) the kernel / functional / layer suites with
``FASTPURIFY_TEST_DEVICE=cuda`` (tests/devices.py: their tensors on the GPU, so the Triton
kernels are compiled, not interpreted), in parallel with pytest-xdist and a per-test timeout
(pytest-timeout) where the machine has them. Every outcome is logged as it happens
(:mod:`.pytest_log`), so a part killed at its deadline still reports what ran. The number of
kernels Triton compiled is read off its cache.

``sanitizer`` runs ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` over the
kernel tests (direct launches on small shapes, outputs NaN-poisoned), with PyTorch's caching
allocator off so that every tensor is its own allocation and an out-of-bounds access is seen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import pytest_log
from .environment import ROOT, sanitizer_path

SUITES = ["tests/kernels", "tests/test_functional_batch_norm.py", "tests/test_functional_layer_norm.py",
          "tests/test_functional_group_norm.py", "tests/test_functional_updates.py", "tests/test_layers.py",
          "tests/test_layers_norms.py", "tests/test_eval_norms.py"]
DRY_SUITES = ["tests/kernels/test_batch_norm_kernel.py", "-k", "writes_every_output and not shape2"]  # ~5 s on CPU
# Under memcheck on an H200 the kernel tests ran at about one a second (47 in 44 s, the real-shape
# ones slowest): the BatchNorm outputs-written tests, the split reductions in training mode, and
# the LayerNorm forward at the launcher's own tiles, about 30 tests.
SANITIZED = ["tests/kernels/test_batch_norm_kernel.py", "tests/kernels/test_layer_norm_kernel.py",
             "tests/kernels/test_group_norm_kernel.py", "-k",
             "(batch_norm and (writes_every or (split_reductions and train))) or "
             "(layer_norm and forward_writes and None and noisy) or "
             "(group_norm and (forward_and_every_gradient and split))"]
# racecheck ran slower than memcheck and never reached its summary in 44 s: the reductions that
# share memory across a program's threads (split BatchNorm in training mode, GroupNorm), 13 tests.
RACECHECKED = ["tests/kernels/test_batch_norm_kernel.py", "tests/kernels/test_group_norm_kernel.py", "-k",
               "(batch_norm and split_reductions and train) or (group_norm and forward_and_every_gradient and split)"]
PER_TEST_TIMEOUT_S = 180


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def compiled_kernels() -> int:
    """Kernels in Triton's cache (one .cubin per compiled specialisation)."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    return sum(1 for _ in Path(cache).rglob("*.cubin")) if cache and Path(cache).exists() else 0


def pytest_command(selection: list[str], *, workers: int, timeout: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fastpurify.gpucheck.pytest_log",
           "-o", "console_output_style=classic", *selection]
    if workers > 1:
        cmd += ["-n", str(workers)]
    if timeout:
        cmd += [f"--timeout={timeout}"]
    return cmd


class PytestRun:
    """One pytest process (its own process group), started at once; :meth:`finish` waits until a
    deadline, kills it (with its xdist workers or the sanitizer around it) past that, and returns
    its outcomes (counts, failures) and exit status."""

    def __init__(self, name: str, selection: list[str], *, out_dir: Path, env: dict, workers: int = 1,
                 timeout: int | None = None, prefix: list[str] | None = None):
        self.log_path = out_dir / "logs" / f"pytest-{name}.jsonl"
        self.log_path.unlink(missing_ok=True)
        self.cmd = [*(prefix or []), *pytest_command(selection, workers=workers, timeout=timeout)]
        self.out = open(out_dir / "logs" / f"pytest-{name}.log", "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=dict(env, **{pytest_log.LOG_ENV: str(self.log_path)}),
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, deadline: float) -> dict:
        try:
            code, timed_out = self.proc.wait(timeout=max(deadline - time.monotonic(), 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            code, timed_out = None, True
        self.out.close()
        return {"command": " ".join(self.cmd), "exit_code": code, "timed_out": timed_out,
                **pytest_log.summarize(self.log_path)}


def part_problem(r: dict) -> str | None:
    """What went wrong in a test run (failures, a timeout, pytest's own error), or None."""
    if r["failures"] or r["timed_out"] or r["exit_code"] not in (0, 5):
        return (f"{len(r['failures'])} failed of {r['ran']} run{', timed out' if r['timed_out'] else ''} "
                f"(exit {r['exit_code']})")
    return None


def run_tests(record, opts) -> None:
    """Both parts at once (on an H200 the gpu-marked part alone did not finish in 40 % of the
    stage while the suites took 45 s: both pay xdist's start-up)."""
    out_dir = Path(opts.out)
    cores = os.cpu_count() or 2
    parallel = not opts.dry_run and _has("xdist")
    # The compiled suites (660 tests, ~185 s of test time on an H200, mostly Triton compiling on
    # the CPU) get half the cores; the 22 gpu-marked tests (~55 s on 4 workers) a quarter.
    workers = {"gpu-marked": max(1, min(4, cores // 4)) if parallel else 1,
               "compiled": max(1, min(8, cores // 2)) if parallel else 1}
    timeout = PER_TEST_TIMEOUT_S if _has("pytest_timeout") else None
    record.put(workers_per_part=workers, per_test_timeout_s=timeout, kernels_compiled_before=compiled_kernels())
    suites = DRY_SUITES if opts.dry_run else SUITES
    device_env = {} if opts.dry_run else {"FASTPURIFY_TEST_DEVICE": "cuda"}
    started = time.monotonic()
    runs = {"gpu-marked": PytestRun("gpu-marked", ["tests", "-m", "gpu"], out_dir=out_dir, env=dict(os.environ),
                                    workers=workers["gpu-marked"], timeout=timeout),
            "compiled": PytestRun("compiled", suites, out_dir=out_dir, env=dict(os.environ, **device_env),
                                  workers=workers["compiled"], timeout=timeout)}
    parts = {}
    for name, run in runs.items():
        parts[name] = run.finish(record.deadline - 1)
        record.put(parts=parts, kernels_compiled=compiled_kernels())
        problem = part_problem(parts[name])
        record.step(f"{name} tests", "failed" if problem else "ok", started, problem or "")


SUMMARY_LINE = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY)[^\n]*")


def findings(text: str) -> list[str]:
    """The tool's reports of an error or hazard (its summary lines, e.g. "RACECHECK SUMMARY: 0
    hazards displayed", are not findings), at most 30."""
    return [line for line in text.splitlines() if line.startswith("=========") and not SUMMARY_LINE.search(line)
            and re.search(r"Invalid|Race|hazard|Hazard|out of bounds|misaligned", line)][:30]


def judge(r: dict, text: str) -> dict:
    """A sanitizer run's verdict from its log ``text``, into its record ``r`` (``exit_code``,
    ``timed_out``): the tool's summary lines, its findings and whether it is clean: the tool
    summarised every process with no error and did not exit with its error code (a failing test
    is reported in the counts and failures, not here)."""
    r["summary"] = [m.group(0).strip() for m in SUMMARY_LINE.finditer(text)]
    r["findings"] = findings(text)
    r["clean"] = (bool(r["summary"]) and all(re.search(r"\b0 errors", s) for s in r["summary"])
                  and not r["findings"] and r["exit_code"] != 86 and not r["timed_out"])
    return r


def run_sanitizer(record, opts) -> None:
    """memcheck and racecheck at once, each over its small selection; a run cut off at the
    deadline keeps the findings printed so far (the tool prints each as it happens)."""
    from .plan import cannot_run

    why = cannot_run("sanitizer", dry_run=opts.dry_run, cifar=None)
    if why:  # the plan gives such a stage no time; kept for a direct call
        record.finish("skipped", why)
        return
    tool = sanitizer_path()
    out_dir = Path(opts.out)
    env = dict(os.environ, FASTPURIFY_TEST_DEVICE="cuda", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    started = time.monotonic()
    runs = {which: PytestRun(which, SANITIZED if which == "memcheck" else RACECHECKED, out_dir=out_dir, env=env,
                             prefix=[tool, "--tool", which, "--error-exitcode", "86", "--print-limit", "30",
                                     "--target-processes", "all"]) for which in ("memcheck", "racecheck")}
    results = {}
    for which, run in runs.items():
        r = run.finish(record.deadline - 1)
        judge(r, (out_dir / "logs" / f"pytest-{which}.log").read_text(errors="replace"))
        results[which] = r
        record.put(sanitizer=results)
        if r["clean"] and not r["failures"]:
            record.step(which, "ok", started)
        else:
            record.step(which, "failed", started,
                        f"{which}: {r['summary'] or 'no summary'}; {len(r['findings'])} finding(s) in {r['ran']} "
                        f"test(s); exit {r['exit_code']}{', timed out' if r['timed_out'] else ''}")
