"""The kernels outside the BatchNorm and GroupNorm compile suites — ANP's batch (gather, crop,
flip), LayerNorm (ViT-B/16 tokens; LayerNorm2d on NCHW and NHWC at ConvNeXt-T's stages) and PBE's
row cosine — compiled for an H100 (sm_90) by the GPU's Triton without a GPU, through their real
launchers (see ``sm90_compile.py``): each compiles, none spills, none needs more than 128
registers a thread (LayerNorm2d's NCHW tiles of 8,192 values took 188-221, the cosine's full tiles
254 with a stack frame), and the cosine and the batch kernel fill the GPU."""

import pytest
import torch

from fastpurify.kernels.runtime import SM_COUNT_WITHOUT_GPU

from .sm90_compile import assert_no_spills, compile_both_layouts

KERNELS = {"gather_augment_kernel", "ln_forward_kernel", "ln_backward_kernel", "ln_param_grads_kernel",
           "row_cosine_kernel"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_the_other_kernels_compile_without_spills():
    compiled = compile_both_layouts("--op", "other")
    assert_no_spills(compiled, KERNELS)
    launches = [launch for run in compiled for launch in run["launches"]]
    cosine = [launch["grid"][0] for launch in launches if launch["kernel"] == "row_cosine_kernel"]
    assert len(cosine) == 3 and min(cosine) >= SM_COUNT_WITHOUT_GPU  # 2,500 rows of 10 included
    batch = [launch["grid"] for launch in launches if launch["kernel"] == "gather_augment_kernel"]
    assert len(batch) == 4 and all(grid[:2] == [128, 3] for grid in batch)  # a program row per image
    param_grads = [launch["grid"][0] for launch in launches if launch["kernel"] == "ln_param_grads_kernel"]
    assert 24 in param_grads  # C = 768 in 32-feature programs (it was 6)
