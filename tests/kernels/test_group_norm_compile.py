"""The GroupNorm kernels compiled for an H100 (sm_90) by the Triton the GPU machines run, without a
GPU: through the real launchers (``perturbed_group_norm`` forward and backward) on meta tensors, at
every GroupNorm shape of PoolFormer-S12 (one channel group) and ResNet-50-GN (32 channel groups) at
224 px, both layouts, plus the branches ANP does not take (see ``sm90_compile.py``). Checks that
every variant compiles, that none spills registers, and that every launch asks for at least one
program per SM, except the parameter gradients alone (x needs no gradient: one program per 64
channels over a buffer of a few KB).

Two processes (contiguous and channels_last: disjoint variants) compile in parallel; Triton's
on-disk cache makes a second run take seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpurify.kernels.runtime import SM_COUNT_WITHOUT_GPU

from .sm90_compile import GN_SHAPES

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"gn_stats_kernel", "gn_normalize_kernel", "gn_grad_sums_kernel", "gn_param_sums_kernel",
           "gn_grad_apply_kernel"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")


@pytest.fixture(scope="module")
def compiled():
    """The launches and compiled kernels of both layouts, as ``sm90_compile --op gn`` reports them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, "-m", "tests.kernels.sm90_compile", "--op", "gn", "--all-modes",
                              "--layout", layout], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for layout in ("contiguous", "channels_last")]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        if run.returncode == 3:
            pytest.skip(f"this Triton cannot compile ahead of time here: {err.strip()[-500:]}")
        assert run.returncode == 0, f"compiling for sm_90 failed:\n{err[-6000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_every_variant_compiles_without_spills(compiled):
    kernels = {h: k for run in compiled for h, k in run["kernels"].items()}
    assert {k["name"] for k in kernels.values()} == KERNELS
    spilled = [k for k in kernels.values() if k["n_spills"] or k["stack"]]
    assert not spilled, f"register spills (local memory or a stack frame): {spilled}"
    assert all(k["registers"] <= 128 for k in kernels.values()), \
        f"at most 128 registers (4 programs an SM): {[k for k in kernels.values() if k['registers'] > 128]}"


def test_every_launch_fills_an_h100(compiled):
    launches = [launch for run in compiled for launch in run["launches"]]
    anp = [launch for launch in launches if launch["anp"]]
    cases = [case for run in compiled for case in run["cases"]]
    # every shape in both layouts; forward 2 launches, backward 3 (sums, per-group sums, dx + parameters)
    assert len(cases) == 2 * len(GN_SHAPES) and len(anp) == 5 * len(cases)
    assert [launch["kernel"] for launch in anp[:5]] == ["gn_stats_kernel", "gn_normalize_kernel",
                                                         "gn_grad_sums_kernel", "gn_param_sums_kernel",
                                                         "gn_grad_apply_kernel"]
    small = [launch for launch in anp if launch["grid"][0] < SM_COUNT_WITHOUT_GPU]
    assert not small, f"ANP launches with fewer programs than SMs: {small}"
    small = [launch for launch in launches if launch["touches_activations"]
             and launch["grid"][0] < SM_COUNT_WITHOUT_GPU]
    assert not small, f"launches with fewer programs than SMs: {small}"
    # The only launch that may be small: the parameter gradients alone (x needs no gradient).
    assert all(launch["kernel"] == "gn_grad_apply_kernel" for launch in launches if not launch["touches_activations"])
