"""ANP's fused batch kernel (gather, crop, flip: kernels/augment.py) compiled for an H100 (sm_90)
by the GPU's Triton without a GPU, into both buffer layouts (see ``sm90_compile.py``): it compiles,
spills nothing, and asks for one program row per image."""

import pytest
import torch

from .sm90_compile import assert_no_spills, compile_both_layouts


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_the_batch_kernel_compiles_without_spills():
    compiled = compile_both_layouts("--op", "augment")
    assert_no_spills(compiled, {"gather_augment_kernel"})
    launches = [launch for run in compiled for launch in run["launches"]]
    assert len(launches) == 4 and all(launch["grid"] == [128, 3, 1] or launch["grid"] == [128, 3]
                                      for launch in launches)
