"""The GroupNorm kernels called directly, outputs poisoned with NaN before each launch so that an
element the kernels fail to write is caught; checked against the float64 formulas
(tests/formulas.py). Each case runs with the launcher's own plan (one split a row under the
interpreter) and with forced small tiles and several channel and position splits a row, the last
ones shorter, which reach every path of the two-stage reductions."""

import pytest
import torch

from fastpurify.kernels import group_norm as GN
from fastpurify.kernels.group_norm import gn_backward, gn_forward, launch_plan
from fastpurify.kernels.runtime import SM_COUNT_WITHOUT_GPU

from ..devices import TEST_DEVICE, on_device
from ..formulas import group_norm, group_norm_grads, random_bn_params
from .sm90_compile import GN_SHAPES

CASES = [  # (shape, num_groups, groups, layout)
    ((3, 12), 4, 3, "nchw"),          # 2-D (N, C): S = 1; three batch groups
    ((2, 6, 5, 7), 3, 2, "nchw"),     # positions inner
    ((2, 6, 5, 7), 3, 2, "nhwc"),     # channels inner
    ((2, 3, 1, 1), 1, 1, "nchw"),     # 1x1: a row is the sample's channels
    ((3, 3, 3, 5), 3, 3, "nhwc"),     # num_groups = C (one channel a row)
    ((2, 12, 4, 3), 6, 2, "nchw"),
]
# Forced (splits, tile): several channel splits by several position splits, the last ones shorter.
FORCED = dict(splits=(2, 2), tile=(2, 16))
ids = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731


def make(shape, groups, layout, dtype=torch.float32, seed=0):
    x = on_device((torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5).to(dtype))
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, {k: v.to(dtype) for k, v in random_bn_params(shape[1], groups, seed).items()}


def ncs(t):
    """The (N, C, S) view the launchers take."""
    return t.view(t.shape[0], t.shape[1], -1)


def launch_forward(x, p, num_groups, groups, **plan):
    x3 = ncs(x)
    y3 = torch.full_like(x3, float("nan"))
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.full((x.shape[0] * num_groups,), float("nan"), dtype=stat, device=x.device)
    rstd = torch.full_like(mean, float("nan"))
    gn_forward(x3, y3, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd,
               num_groups=num_groups, groups=groups, eps=1e-5, **plan)
    return x3, y3, mean, rstd


def launch_backward(x3, dy3, p, mean, rstd, num_groups, groups, asked=("x", "mask", "noise", "noise_bias", "weight",
                                                                        "bias"), **plan):
    """The outputs in ``asked`` (those whose parameter exists), each poisoned with NaN."""
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    out = {k: nan(x3 if k == "x" else p[k]) for k in asked if k == "x" or p[k] is not None}
    gn_backward(x3, dy3, out.get("x"), p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd,
                num_groups=num_groups, groups=groups, dmask=out.get("mask"), dnoise=out.get("noise"),
                dnoise_bias=out.get("noise_bias"), dweight=out.get("weight"), dbias=out.get("bias"), **plan)
    return out


def assert_close(out, ref, shape, atol=5e-5, rtol=1e-4):
    for k, got in out.items():
        assert not torch.isnan(got).any(), f"d{k} has unwritten elements"
        got = got.view(shape) if k == "x" else got
        scale = ref[k].abs().max().item() + 1.0
        assert torch.allclose(got.double(), ref[k], atol=atol * scale, rtol=rtol), k


@pytest.mark.parametrize("plan", [{}, FORCED], ids=["own-plan", "split"])
@pytest.mark.parametrize("shape, num_groups, groups, layout", CASES, ids=ids)
def test_forward_and_every_gradient(shape, num_groups, groups, layout, plan):
    x, p = make(shape, groups, layout)
    x3, y3, mean, rstd = launch_forward(x, p, num_groups, groups, **plan)
    for name, t in (("y", y3), ("mean", mean), ("rstd", rstd)):
        assert not torch.isnan(t).any(), f"{name} has unwritten elements"
    assert torch.allclose(y3.view(shape).double(), group_norm(x, **p, num_groups=num_groups, groups=groups),
                          atol=2e-5, rtol=1e-5)
    rows = x.double().reshape(shape[0] * num_groups, -1)
    assert torch.allclose(mean.double(), rows.mean(1), atol=1e-6)
    assert torch.allclose(rstd.double(), 1 / torch.sqrt(rows.var(1, unbiased=False) + 1e-5), rtol=1e-5)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    out = launch_backward(x3, ncs(dy), p, mean, rstd, num_groups, groups, **plan)
    ref = group_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy,
                           num_groups=num_groups, groups=groups)
    assert set(out) == set(ref)
    assert_close(out, ref, shape)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_forced_plan_splits_both_ways_and_the_last_split_is_shorter(layout):
    x3 = ncs(make((4, 6, 5, 7), 2, layout)[0])
    plan = launch_plan(tuple(x3.shape), x3.stride(), 3, 2, SM_COUNT_WITHOUT_GPU, 4, **FORCED)
    assert plan.pos_inner == (layout == "nchw")
    assert (plan.splits_c, plan.splits_s) == (1, 2)  # two channels a row: one channel tile of 2
    plan = launch_plan(tuple(x3.shape), x3.stride(), 1, 2, SM_COUNT_WITHOUT_GPU, 4, **FORCED)
    assert plan.splits_c == 2 and plan.splits_s == 2 and 6 % plan.qc and 35 % plan.qs  # 4 + 2 channels, 32 + 3
    assert plan.p2 > 1  # the parameter gradients merge several chunks per batch group


@pytest.mark.parametrize("affine, asked", [
    ("none", ("x", "mask", "noise", "noise_bias")),        # weight and bias None: ones and zeros
    ("frozen", ("x",)),                                     # PGD through a frozen model: dx alone
    ("frozen", ("mask", "noise")),                          # x needs no gradient: the small grid
    ("weight-only", ("x", "mask", "noise", "weight")),      # a trainable weight, no bias
])
def test_affine_variants_and_partial_backward(affine, asked):
    shape, num_groups, groups = (2, 6, 3, 5), 2, 2
    x, p = make(shape, groups, "nhwc")
    if affine == "none":
        p["weight"] = p["bias"] = None
    if affine == "weight-only":
        p["bias"] = p["noise_bias"] = None
    x3, y3, mean, rstd = launch_forward(x, p, num_groups, groups, **FORCED)
    assert torch.allclose(y3.view(shape).double(), group_norm(x, **p, num_groups=num_groups, groups=groups),
                          atol=2e-5, rtol=1e-5)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    out = launch_backward(x3, ncs(dy), p, mean, rstd, num_groups, groups, asked, **FORCED)
    assert set(out) == {k for k in asked if k == "x" or p[k] is not None}
    ref = group_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy,
                           num_groups=num_groups, groups=groups)
    assert_close(out, ref, shape)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_float64_is_reduced_in_float64(layout):
    shape = (2, 6, 5, 3)
    x, p = make(shape, 2, layout, torch.float64)
    x3, y3, mean, rstd = launch_forward(x, p, 3, 2, **FORCED)
    assert y3.dtype == mean.dtype == torch.float64
    assert torch.allclose(y3.view(shape), group_norm(x, **p, num_groups=3, groups=2), atol=1e-12, rtol=1e-12)
    dy = on_device(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))
    out = launch_backward(x3, ncs(dy), p, mean, rstd, 3, 2, **FORCED)
    ref = group_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, num_groups=3,
                           groups=2)
    assert_close(out, ref, shape, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    """Loaded and stored in half precision, computed in float32 (the interpreter has no bfloat16
    arithmetic: the kernels convert before computing)."""
    shape = (4, 6, 5, 3)
    x, p = make(shape, 2, "nhwc", dtype)
    p = {k: v.float() for k, v in p.items()}
    _, y3, _, _ = launch_forward(x, p, 3, 2)
    assert y3.dtype == dtype
    ref = group_norm(x.double(), **p, num_groups=3, groups=2)
    assert torch.allclose(y3.view(shape).double(), ref, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=1e-2)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_split_reductions_are_bitwise_deterministic(layout):
    shape = (2, 6, 5, 7)
    x, p = make(shape, 2, layout)
    dy3 = ncs(on_device(torch.randn(shape, generator=torch.Generator().manual_seed(9))))
    runs = []
    for _ in range(2):
        x3, y3, mean, rstd = launch_forward(x, p, 1, 2, **FORCED)
        out = launch_backward(x3, dy3, p, mean, rstd, 1, 2, **FORCED)
        runs.append([y3, mean, rstd, *out.values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("itemsize", [4, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_plan_fills_an_h100(channels_last, itemsize):
    """At every GroupNorm of PoolFormer-S12 and ResNet-50-GN (the sm_90 compile test's shapes) both
    the activation launches and the per-group sums of the parameter gradients ask for at least
    one program per SM; the activation launches for at most 32 per SM; every split covers whole
    tiles and none is empty."""
    for n, c, side, num_groups, groups in GN_SHAPES:
        s = side * side
        strides = (s * c, 1, c) if channels_last else (c * s, s, 1)
        plan = launch_plan((n, c, s), strides, num_groups, groups, SM_COUNT_WITHOUT_GPU, itemsize)
        assert SM_COUNT_WITHOUT_GPU <= plan.programs <= 32 * SM_COUNT_WITHOUT_GPU, (n, c, side, plan)
        assert plan.param_programs >= SM_COUNT_WITHOUT_GPU, (n, c, side, plan)
        cg = c // num_groups
        assert (plan.splits_c - 1) * plan.qc < cg <= plan.splits_c * plan.qc, plan
        assert (plan.splits_s - 1) * plan.qs < s <= plan.splits_s * plan.qs, plan
        assert plan.qc % plan.block_c == 0 and plan.qs % plan.block_s == 0
        assert (plan.p2 - 1) * plan.q2 < n // groups * plan.splits_s <= plan.p2 * plan.q2, plan


def test_plan_follows_the_memory_layout(monkeypatch):
    nchw = torch.empty(4, 64, 32, 32, device=TEST_DEVICE)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    plan = lambda x: launch_plan(tuple(ncs(x).shape), ncs(x).stride(), 1, 1, 132, 4)  # noqa: E731
    assert plan(nchw).pos_inner and plan(nchw).block_s == 1024  # a tile row: 1024 contiguous positions
    assert not plan(nhwc).pos_inner and plan(nhwc).block_c == 64  # a tile row: 64 contiguous channels
    assert not launch_plan((8, 100, 1), (100, 1, 0), 4, 1, 132, 4).pos_inner  # (N, C)
    monkeypatch.setattr(GN, "interpreting", lambda: True)
    # one split a row under the interpreter (CPU tensors: a CUDA tensor is always compiled)
    assert GN.plan_for(ncs(nchw.cpu()), 1, 1).splits == 1
