"""The BatchNorm plan sweep (fastpurify.benchmarks.bn_plans): every candidate plan it would time
computes what the fused operation computes (on the interpreter here, compiled on a GPU), and the
sweep itself runs on a GPU only."""

import pytest
import torch

from fastpurify import functional as FP
from fastpurify.benchmarks import batch_norm as B
from fastpurify.benchmarks.bn_plans import _buffers, candidates, format_table, fused_step, sweep_plans
from fastpurify.validation import InputError

from .devices import TEST_DEVICE


@pytest.mark.parametrize("shape,layout", [((6, 20, 5, 3), "nhwc"), ((4, 3, 17, 2), "nchw")])
def test_every_candidate_plan_computes_the_fused_operation(shape, layout):
    groups = 2
    t = B.make_inputs(shape, groups, layout, TEST_DEVICE)
    y = FP.perturbed_batch_norm(t["x"], t["weight"], t["bias"], t["mask"], t["noise"], t["noise_bias"], groups=groups)
    want = (y.detach(), *torch.autograd.grad(y, (t["x"], t["mask"], t["noise"], t["noise_bias"]), t["dy"]))
    phases, plans = zip(*candidates(shape, layout, groups, sms=132))
    assert plans[0] == {} and phases[0] == 0 and set(phases[1:]) == {1, 2, 3}  # the default, then forced plans
    assert len({(tuple(p["tile"]), p["splits"], p["warps"]) for p in plans[1:]}) == len(plans) - 1
    b = _buffers(t, groups)
    for plan in plans[:1] + plans[1::2]:  # every other forced plan: all tiles, each split and warps value
        fused_step(t, b, groups, plan)()
        got = (b["y"], b["dx"], b["dmask"], b["dnoise"], b["dnoise_bias"])
        for name, a, w in zip(("y", "dx", "dmask", "dnoise", "dnoise_bias"), got, want):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4, msg=f"{name} with {plan}")
        assert b["y"].is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")


def test_candidates_follow_the_layout():
    nhwc = [plan for _, plan in candidates((256, 64, 32, 32), "nhwc", 2, 132)]
    assert {p["tile"][1] for p in nhwc[1:]} == {16, 32, 64}  # rows of at most the 64 channels there are
    assert {p["warps"] for p in nhwc[1:]} == {4, 8}
    assert len(nhwc) == 1 + 6 * 4  # 6 tiles, each at its splits, half and twice, and the other warps
    nchw = [plan for _, plan in candidates((256, 512, 4, 4), "nchw", 2, 132)]
    assert {p["tile"][0] for p in nchw[1:]} == {16}  # runs of at most the 16 positions there are


@pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="checks the refusal without a GPU")
def test_the_sweep_needs_a_gpu():
    with pytest.raises(InputError, match="needs a CUDA device"):
        sweep_plans("smoke", device="cpu")


@pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="the interpreter's sweep; the GPU test below times it")
def test_the_sweep_phase_by_phase_through_the_interpreter():
    """The sweep's bookkeeping (its times mean nothing here): every candidate of every case timed and
    checked against the default, phase by phase, the deadline leaving the rest listed as skipped."""
    phases = []
    result = sweep_plans(((4, 20, 3, 3),), ("nhwc", "nchw"), device="cpu", warmup=0, repeats=1, progress=None,
                         interpret=True, on_phase=lambda r: phases.append(sum(len(row["candidates"]) for row in r["rows"])))
    assert [r["layout"] for r in result["rows"]] == ["nhwc", "nchw"] and not result["skipped"]
    for row in result["rows"]:
        assert len(row["candidates"]) == len(candidates(tuple(row["shape"]), row["layout"], 2, 132))
        assert row["default"]["label"] == "default" and row["best"]["median_ms"] <= row["default"]["median_ms"]
        assert all(c["max_abs_diff"] < 1e-4 for c in row["candidates"])
        assert [c["phase"] for c in row["candidates"]] == sorted(c["phase"] for c in row["candidates"])
        assert row["cudnn_ms"] > 0 and row["copy_gb_per_s"] > 0
    assert len(phases) == 4 and phases == sorted(phases) and phases[0] == 2  # the defaults first
    assert "best plan" in format_table(result)
    cut = sweep_plans(((4, 20, 3, 3),), ("nhwc",), device="cpu", warmup=0, repeats=1, progress=None, interpret=True,
                      deadline=0.0)
    assert cut["rows"][0]["candidates"] == [] and len(cut["skipped"]) == len(candidates((4, 20, 3, 3), "nhwc", 2, 132))


@pytest.mark.gpu
def test_the_sweep_on_a_gpu():
    result = sweep_plans(((16, 24, 8, 8),), ("nhwc", "nchw"), device="cuda", warmup=1, repeats=3, progress=None)
    assert [r["layout"] for r in result["rows"]] == ["nhwc", "nchw"]
    for row in result["rows"]:
        assert row["best"]["median_ms"] <= row["default"]["median_ms"]
        assert all(c["max_abs_diff"] < 1e-3 for c in row["candidates"])
    assert "best plan" in format_table(result)
