"""The BatchNorm kernels compiled for an H100 (sm_90) by the Triton the GPU machines run, without a
GPU: through the real launchers (``perturbed_batch_norm`` forward and backward) on meta tensors, at
every BatchNorm shape of the CIFAR ResNet-18 and of ResNet-50 at 224 px, both layouts (see
``sm90_compile.py``). Checks that every variant compiles, that none spills registers, and that every
launch that reads or writes the activations asks for at least one program per SM.

Two processes (contiguous and channels_last: disjoint variants) compile in parallel; Triton's
on-disk cache makes a second run take seconds."""

import pytest
import torch

from fastpurify.kernels.runtime import SM_COUNT_WITHOUT_GPU

from .sm90_compile import assert_no_spills, compile_both_layouts

KERNELS = {"bn_stats_kernel", "bn_normalize_kernel", "bn_grad_sums_kernel", "bn_grad_apply_kernel"}


@pytest.fixture(scope="module")
def compiled():
    """The launches and compiled kernels of both layouts (the ANP step at every shape, plus the
    other modes once), as ``sm90_compile`` reports them."""
    return compile_both_layouts("--all-modes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_every_variant_compiles_without_spills(compiled):
    assert_no_spills(compiled, KERNELS)


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
