"""Stage ``environment``: install the checkout into the machine's own Python without touching its
packages, and record what the figures were measured on (device, SM count, memory, driver, CUDA,
cuDNN, torch, triton, torchvision, timm, Python, commit, the tools the later stages use) and the
device's copy bandwidth, the ceiling the BatchNorm kernels are held to."""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sanitizer_path() -> str | None:
    """compute-sanitizer on PATH or in the usual CUDA folders."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for folder in ("/usr/local/cuda/bin", "/opt/nvidia/compute-sanitizer", "/usr/local/cuda/compute-sanitizer"):
        candidate = Path(folder) / "compute-sanitizer"
        if candidate.exists():
            return str(candidate)
    return None


def _version(name: str) -> str | None:
    try:
        if name == "torchvision":
            from .._torchvision import import_torchvision
            return import_torchvision().__version__
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def install(record, dry_run: bool) -> None:
    """``pip install --no-deps --no-build-isolation -e ROOT`` (nothing else is installed or
    upgraded); then check that ``fastpurify.kernels`` imports in a fresh process."""
    if dry_run:
        record.put(install={"status": "skipped", "reason": "dry run: the checkout is already installed"})
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "-q",
               "-e", str(ROOT)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(record.left() - 5, 10))
        record.put(install={"status": "ok" if proc.returncode == 0 else "failed", "command": " ".join(cmd),
                            "output_tail": (proc.stdout + proc.stderr)[-2000:]})
    check = [sys.executable, "-c", "import fastpurify.kernels, fastpurify.functional"]
    if subprocess.run(check, cwd=ROOT, capture_output=True, timeout=120).returncode == 0:
        return
    if dry_run:
        raise RuntimeError("fastpurify.kernels does not import: install the checkout (make test does)")
    # The editable install failed: let the checkout's own folder resolve fastpurify.kernels.
    link = ROOT / "fastpurify" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
        record.put(import_fallback_link=str(link))
    if subprocess.run(check, cwd=ROOT, capture_output=True, timeout=120).returncode != 0:
        raise RuntimeError("fastpurify.kernels does not import, even through the fallback link")


def device_facts() -> dict:
    import torch

    from ..benchmarks.common import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    facts = environment(device)
    facts.update(python=platform.python_version(), torchvision=_version("torchvision"), timm=_version("timm"),
                 numpy=_version("numpy"), executable=sys.executable,
                 tools={"compute-sanitizer": sanitizer_path(), "pytest-xdist": _version("xdist") is not None,
                        "pytest-timeout": _version("pytest_timeout") is not None},
                 cpu_count=__import__("os").cpu_count())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     cudnn=torch.backends.cudnn.version(),
                     l2_cache_mb=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1))
    return facts


def copy_bandwidth(dry_run: bool) -> dict:
    """A device-to-device copy of a large tensor; GB/s counting bytes read plus bytes written
    (median of 20 after a warm-up, CUDA events)."""
    import statistics

    import torch

    if dry_run or not torch.cuda.is_available():
        return {"status": "skipped", "reason": "needs CUDA"}
    src = torch.randn(256 * 2 ** 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    med = statistics.median(times)
    return {"bytes": 2 * src.numel() * 4, "median_s": med, "gb_per_s": round(2 * src.numel() * 4 / med / 1e9, 1)}


def run(record, opts) -> None:
    record.run_step("install", lambda: install(record, opts.dry_run), optional=False)
    record.run_step("device", lambda: record.put(environment=device_facts()), optional=False)
    record.run_step("copy bandwidth", lambda: record.put(copy_bandwidth=copy_bandwidth(opts.dry_run)))
