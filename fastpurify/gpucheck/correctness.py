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
from pathlib import Path

from . import pytest_log
from .environment import ROOT, sanitizer_path

SUITES = ["tests/kernels", "tests/test_functional_batch_norm.py", "tests/test_functional_layer_norm.py",
          "tests/test_functional_updates.py", "tests/test_layers.py"]
DRY_SUITES = ["tests/kernels/test_batch_norm_kernel.py", "-k", "writes_every_output and not shape2"]  # ~5 s on CPU
# Every BatchNorm kernel test and the LayerNorm ones at the launcher's own tiles, noisy: about 40
# tests, a few seconds each under memcheck on an H100 (the whole two files did not fit 36 s).
SANITIZED = ["tests/kernels/test_batch_norm_kernel.py", "tests/kernels/test_layer_norm_kernel.py",
             "-k", "batch_norm or (layer_norm and writes_every and None and noisy and not clean)"]
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


def run_pytest(name: str, selection: list[str], *, seconds: float, out_dir: Path, env: dict, workers: int = 1,
               timeout: int | None = None, prefix: list[str] | None = None) -> dict:
    """One pytest run for at most ``seconds``; its outcomes (counts, failures) and exit status."""
    log_path = out_dir / "logs" / f"pytest-{name}.jsonl"
    log_path.unlink(missing_ok=True)
    cmd = [*(prefix or []), *pytest_command(selection, workers=workers, timeout=timeout)]
    env = dict(env, **{pytest_log.LOG_ENV: str(log_path)})
    with open(out_dir / "logs" / f"pytest-{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(seconds, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code, timed_out = None, True
    outcomes = pytest_log.read(log_path)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    failures = [{"test": o["test"], "when": o["when"], "message": o["message"]} for o in outcomes if
                o["outcome"] == "failed"]
    return {"command": " ".join(cmd), "exit_code": code, "timed_out": timed_out, "counts": counts,
            "ran": len(outcomes), "failures": failures,
            "slowest": sorted(({"test": o["test"], "seconds": o["seconds"]} for o in outcomes),
                              key=lambda o: -o["seconds"])[:5]}


def run_tests(record, opts) -> None:
    out_dir = Path(opts.out)
    workers = 1 if opts.dry_run or not _has("xdist") else max(1, min(8, (os.cpu_count() or 2) // 2))
    timeout = PER_TEST_TIMEOUT_S if _has("pytest_timeout") else None
    record.put(workers=workers, per_test_timeout_s=timeout, kernels_compiled_before=compiled_kernels())
    env = dict(os.environ)
    results = {}

    def part(name, selection, share, device_env):
        seconds = record.left() * share
        run_env = dict(env, **({"FASTPURIFY_TEST_DEVICE": "cuda"} if device_env else {}))
        results[name] = run_pytest(name, selection, seconds=seconds, out_dir=out_dir, env=run_env, workers=workers,
                                   timeout=timeout)
        record.put(parts=results, kernels_compiled=compiled_kernels())
        r = results[name]
        if r["failures"] or r["timed_out"] or r["exit_code"] not in (0, 5):
            raise RuntimeError(f"{len(r['failures'])} failed of {r['ran']} run"
                               f"{', timed out' if r['timed_out'] else ''} (exit {r['exit_code']})")

    record.run_step("gpu-marked tests", lambda: part("gpu-marked", ["tests", "-m", "gpu"], 0.4, False), need=5)
    record.run_step("compiled suites", lambda: part("compiled", DRY_SUITES if opts.dry_run else SUITES, 0.97,
                                                    not opts.dry_run), need=5)


SUMMARY_LINE = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY)[^\n]*")


def run_sanitizer(record, opts) -> None:
    tool = sanitizer_path()
    if opts.dry_run:
        record.finish("skipped", "dry run: compute-sanitizer needs a CUDA device")
        return
    if tool is None:
        record.finish("skipped", "compute-sanitizer not found on PATH or in /usr/local/cuda/bin")
        return
    out_dir = Path(opts.out)
    env = dict(os.environ, FASTPURIFY_TEST_DEVICE="cuda", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    results = {}
    for i, which in enumerate(("memcheck", "racecheck")):
        def check(which=which, share=0.5 if i == 0 else 0.97):
            prefix = [tool, "--tool", which, "--error-exitcode", "86", "--print-limit", "30",
                      "--target-processes", "all"]
            r = run_pytest(which, SANITIZED, seconds=record.left() * share, out_dir=out_dir, env=env, prefix=prefix)
            text = (out_dir / "logs" / f"pytest-{which}.log").read_text(errors="replace")
            r["summary"] = [m.group(0).strip() for m in SUMMARY_LINE.finditer(text)]
            r["findings"] = [line for line in text.splitlines() if line.startswith("=========") and
                             re.search(r"Invalid|Race|hazard|Hazard|out of bounds|misaligned", line)][:30]
            # Clean: the tool summarised every process with no error, and did not exit with its
            # error code (a failing test is reported in counts/failures, not here).
            r["clean"] = (bool(r["summary"]) and all(re.search(r"\b0 errors", s) for s in r["summary"])
                          and not r["findings"] and r["exit_code"] != 86 and not r["timed_out"])
            results[which] = r
            record.put(sanitizer=results)
            if not r["clean"] or r["failures"]:
                raise RuntimeError(f"{which}: {r['summary'] or 'no summary'}; {len(r['findings'])} finding(s); "
                                   f"exit {r['exit_code']}{', timed out' if r['timed_out'] else ''}")
        record.run_step(which, check, need=10)
