"""The BatchNorm kernels compiled for an H100 (sm_90) by the Triton the GPU machines run, without a
GPU: through the real launchers (``perturbed_batch_norm`` forward and backward) on meta tensors, at
every BatchNorm shape of the CIFAR ResNet-18 and of ResNet-50 at 224 px, both layouts (see
``sm90_compile.py``). Checks that every variant compiles, that none spills registers, and that every
launch that reads or writes the activations asks for at least one program per SM.

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

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled():
    """The launches and compiled kernels of both layouts (the ANP step at every shape, plus the
    other modes once), as ``sm90_compile`` reports them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, "-m", "tests.kernels.sm90_compile", "--all-modes", "--layout", layout],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for layout in ("contiguous", "channels_last")]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        if run.returncode == 3:
            pytest.skip(f"this Triton cannot compile ahead of time here: {err.strip()[-500:]}")
        assert run.returncode == 0, f"compiling for sm_90 failed:\n{err[-6000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_every_variant_compiles_without_spills(compiled):
    kernels = {h: k for run in compiled for h, k in run["kernels"].items()}
    assert {k["name"] for k in kernels.values()} == {"bn_stats_kernel", "bn_normalize_kernel", "bn_grad_sums_kernel",
                                                     "bn_grad_apply_kernel"}
    spilled = [k for k in kernels.values() if k["n_spills"] or k["stack"]]
    assert not spilled, f"register spills (local memory or a stack frame): {spilled}"
    assert all(k["registers"] <= 128 for k in kernels.values()), "at most 128 registers: 4 programs an SM"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_every_activation_launch_fills_an_h100(compiled):
    launches = [launch for run in compiled for launch in run["launches"]]
    anp = [launch for launch in launches if launch["anp"]]
    cases = [case for run in compiled for case in run["cases"]]
    assert len(cases) == 2 * 34 and len(anp) == 4 * len(cases)  # 34 shapes x 2 layouts; 2 + 2 kernels each
    small = [launch for launch in launches
             if launch["touches_activations"] and launch["grid"][0] < SM_COUNT_WITHOUT_GPU]
    assert not small, f"launches with fewer programs than SMs: {small}"
    # The only launch that may be small is the per-channel gradients alone (x needs no gradient).
    assert all(launch["kernel"] == "bn_grad_apply_kernel" for launch in launches if not launch["touches_activations"])
