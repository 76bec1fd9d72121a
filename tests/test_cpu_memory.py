"""Keeping freed memory (glibc's malloc thresholds): eager steps stop page-faulting their blocks
in again; the command line's opt-out; what a benchmark records."""

import platform
import subprocess
import sys

import pytest

from fastpurify import cpu_memory
from fastpurify.benchmarks.common import environment

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh process (the setting is process-wide and permanent): the minor page faults of each of
# five eager forward and backward steps of the small CNN at batch 32, after three steps of warm-up
# (the first backward allocates the gradients; kept memory reaches its peak heap within three steps).
# The test compares the median step, so a one-off event in a step does not decide it (CI once counted
# 2,049 faults in five kept steps, against 4,645 by default). Measured on this project's 2-core CPU,
# ten fresh processes each: the median step faults 993-3,265 times by default, 0-256 times kept.
FAULTS = """
import resource, sys, torch
from fastpurify.cpu_memory import keep_freed_memory
from fastpurify.models import small_cnn
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
net, x = small_cnn(num_classes=10, in_channels=3, width=16), torch.rand(32, 3, 32, 32)
for _ in range(3):
    net(x).sum().backward()
steps = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).sum().backward()
    steps.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*steps)
"""


def _faults(mode: str) -> list[int]:
    """The minor page faults of each measured step."""
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(v) for v in out.stdout.split()[-5:]]


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: Linux with glibc only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    median = lambda steps: sorted(steps)[len(steps) // 2]  # noqa: E731
    assert median(default) > 0, "glibc unmaps the freed activations: the next step faults them in again"
    assert median(kept) * 3 < median(default), f"kept memory still faults: steps {kept} against {default} by default"


def test_the_command_line_opt_out(monkeypatch):
    monkeypatch.setenv(cpu_memory.OPT_OUT, "0")
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: pytest.fail("opted out, yet called"))
    assert cpu_memory.keep_freed_memory_unless_opted_out() is False


def test_benchmarks_record_the_malloc_state():
    import torch

    state = environment(torch.device("cpu"))["malloc"]
    assert state == cpu_memory.malloc_state() and isinstance(state["keep_freed_memory"], bool)
