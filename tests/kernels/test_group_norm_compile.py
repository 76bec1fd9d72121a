"""The GroupNorm kernels compiled for an H100 (sm_90) by the Triton the GPU machines run, without a
GPU: through the real launchers (``perturbed_group_norm`` forward and backward) on meta tensors, at
every GroupNorm shape of PoolFormer-S12 (one channel group) and ResNet-50-GN (32 channel groups) at
224 px, both layouts, plus the branches ANP does not take (see ``sm90_compile.py``). Checks that
every variant compiles, that none spills registers, and that every launch asks for at least one
program per SM, except the parameter gradients alone (x needs no gradient: one program per 64
channels over a buffer of a few KB).

Two processes (contiguous and channels_last: disjoint variants) compile in parallel; Triton's
on-disk cache makes a second run take seconds."""

import pytest
import torch

from fastpurify.kernels.runtime import SM_COUNT_WITHOUT_GPU

from .sm90_compile import GN_SHAPES, assert_no_spills, compile_both_layouts

KERNELS = {"gn_stats_kernel", "gn_normalize_kernel", "gn_grad_sums_kernel", "gn_param_sums_kernel",
           "gn_grad_apply_kernel"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")


@pytest.fixture(scope="module")
def compiled():
    """The launches and compiled kernels of both layouts, as ``sm90_compile --op gn`` reports them."""
    return compile_both_layouts("--op", "gn", "--all-modes")


def test_every_variant_compiles_without_spills(compiled):
    assert_no_spills(compiled, KERNELS)


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
