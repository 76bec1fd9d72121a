"""The BatchNorm kernels called directly, outputs poisoned with NaN before each launch so that an
element the kernels fail to write is caught; checked against the float64 formulas. Each case runs
with the launcher's own plan (one split at these sizes) and, in the split tests, with forced
small tiles and several row splits (the last one shorter) that reach every path of the two-stage
reductions: partial statistics merged across splits, running statistics written once, the
per-channel gradients written by one program per channel block."""

import pytest
import torch

from fastpurify.kernels import batch_norm as BN
from fastpurify.kernels.batch_norm import bn_backward, bn_forward, launch_plan
from fastpurify.kernels.runtime import SM_COUNT_WITHOUT_GPU, sm_count

from ..devices import on_device
from ..formulas import _grads, batch_norm, batch_norm_grads, random_bn_params, random_running_stats
from .resnet_shapes import BN_SHAPES

CASES = [  # (shape, groups, training, channels_last)
    ((8, 3), 2, True, False),
    ((7, 17), 1, True, False),
    ((6, 65, 3, 3), 3, True, False),
    ((4, 17, 9, 13), 2, True, False),
    ((4, 17, 9, 13), 2, True, True),
    ((5, 3, 7, 7), 1, False, False),
    ((2, 65, 1, 1), 2, False, True),
    ((1, 3, 7, 7), 1, False, False),
]


def make(shape, groups, channels_last, seed=0):
    x = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, random_bn_params(shape[1], groups, seed), random_running_stats(shape[1], seed + 5)


def ncs(x):
    """The (N, C, S) view the launchers take."""
    return x.view(x.shape[0], x.shape[1], -1)


def launch_forward(x, p, stats, groups, training, update, **plan):
    c = x.shape[1]
    x3 = ncs(x)
    y3 = torch.full_like(x3, float("nan"))
    mean = torch.full((groups, c), float("nan"), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    rstd = torch.full_like(mean, float("nan"))
    bn_forward(x3, y3, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], stats["running_mean"],
               stats["running_var"], mean, rstd, groups=groups, training=training, update_running=update,
               momentum=0.1, eps=1e-5, **plan)
    return x3, y3, mean, rstd


def launch_backward(x3, dy3, p, mean, rstd, groups, training, **plan):
    """All outputs asked for, each poisoned with NaN: a dict with keys x, mask, noise, noise_bias, weight, bias."""
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    out = dict(x=nan(x3), mask=nan(p["mask"]), noise=nan(p["noise"]), noise_bias=nan(p["noise_bias"]),
               weight=nan(p["weight"]), bias=nan(p["bias"]))
    bn_backward(x3, dy3, out["x"], p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd,
                groups=groups, training=training, dmask=out["mask"], dnoise=out["noise"],
                dnoise_bias=out["noise_bias"], dweight=out["weight"], dbias=out["bias"], **plan)
    return out


def assert_gradients(out, x, p, dy, stats, groups, training):
    ref = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **stats,
                           training=training, groups=groups)
    out = dict(out, x=out["x"].view(x.shape))
    for k, v in out.items():
        assert not torch.isnan(v).any(), f"d{k} has unwritten elements"
        scale = ref[k].abs().max().item() + 1.0
        assert torch.allclose(v.double(), ref[k], atol=5e-5 * scale, rtol=1e-4), k


@pytest.mark.parametrize("shape, groups, training, channels_last", CASES)
def test_forward_writes_every_output(shape, groups, training, channels_last):
    x, p, stats = make(shape, groups, channels_last)
    before = {k: v.clone() for k, v in stats.items()}
    _, y3, mean, rstd = launch_forward(x, p, stats, groups, training, update=training)
    ref, rm, rv = batch_norm(x, **p, **before, training=training, groups=groups)
    assert not torch.isnan(y3).any() and not torch.isnan(mean).any() and not torch.isnan(rstd).any()
    assert torch.allclose(y3.view(shape).double(), ref, atol=2e-5, rtol=1e-5)
    if training:
        assert torch.allclose(stats["running_mean"].double(), rm, atol=1e-6)
        assert torch.allclose(stats["running_var"].double(), rv, atol=1e-6)
    else:
        assert all(torch.equal(stats[k], before[k]) for k in stats)


@pytest.mark.parametrize("shape, groups, training, channels_last", CASES)
def test_backward_writes_every_output(shape, groups, training, channels_last):
    x, p, stats = make(shape, groups, channels_last)
    x3, _, mean, rstd = launch_forward(x, p, stats, groups, training, update=False)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    out = launch_backward(x3, dy.view_as(x3), p, mean, rstd, groups, training)
    assert_gradients(out, x, p, dy, stats, groups, training)


def test_backward_skips_what_is_not_asked():
    x, p, stats = make((6, 5, 4, 4), 2, False)
    x3, _, mean, rstd = launch_forward(x, p, stats, 2, True, update=False)
    dx = torch.full_like(x3, float("nan"))
    dmask = torch.full_like(p["mask"], float("nan"))
    bn_backward(x3, torch.randn_like(x3), dx, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean,
                rstd, groups=2, training=True, dmask=dmask)
    assert not torch.isnan(dx).any() and not torch.isnan(dmask).any()


# Forced plans: (shape, groups, layout, splits, tile). Layouts: "nchw" (positions inner), "nhwc"
# (channels inner, rows merged), "2d" (N, C), "strided" (N, C, W) holding every other position of
# a wider tensor (channels inner, rows that do not merge: r -> (n, s) by division).
SPLIT_CASES = [
    ((6, 5, 7, 5), 2, "nchw", 7, (8, 2)),    # 3 samples x 2 position ranges (24 + 11) a group
    ((9, 5, 7, 5), 3, "nchw", 2, (16, 4)),   # splits along the samples only: 2 + 1
    ((1, 3, 9, 9), 1, "nchw", 3, (16, 2)),   # one sample: its positions split 32 + 32 + 17
    ((6, 5, 7, 5), 2, "nhwc", 4, (8, 4)),    # 105 rows a group: 32 + 32 + 32 + 9
    ((6, 9, 5, 3), 3, "nhwc", 5, (4, 8)),    # 30 rows: 8 + 8 + 8 + 6; two channel blocks, one ragged
    ((14, 7), 2, "2d", 4, (2, 4)),           # 7 rows a group: 2 + 2 + 2 + 1
    ((4, 6, 9), 2, "strided", 3, (4, 4)),    # 18 rows: 8 + 8 + 2
]


def make_layout(shape, groups, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # moved to the device before slicing: .to() would make it contiguous
        x = on_device(torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 2 + 0.5)[..., ::2]
    else:
        x = on_device(torch.randn(shape, generator=g) * 2 + 0.5)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    return x, random_bn_params(shape[1], groups, seed), random_running_stats(shape[1], seed + 5)


def split_plan(x3, groups, splits, tile):
    return launch_plan(tuple(x3.shape), (x3.stride(0), x3.stride(1), x3.stride(2)), groups, SM_COUNT_WITHOUT_GPU,
                       x3.element_size(), splits=splits, tile=tile)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, groups, layout, splits, tile", SPLIT_CASES, ids=str)
def test_split_reductions(shape, groups, layout, splits, tile, training):
    """Forward, running statistics and every gradient with several splits a group, the last one shorter."""
    x, p, stats = make_layout(shape, groups, layout)
    x3 = ncs(x)
    plan = split_plan(x3, groups, splits, tile)
    q, t = plan.split_size
    u0, u1 = plan.domain
    assert plan.splits > 1 and (u0 % q or u1 % t), "the case must have several splits, the last one shorter"
    assert plan.channels_inner == (layout != "nchw")
    before = {k: v.clone() for k, v in stats.items()}
    force = dict(splits=splits, tile=tile)
    _, y3, mean, rstd = launch_forward(x, p, stats, groups, training, update=training, **force)
    ref, rm, rv = batch_norm(x, **p, **before, training=training, groups=groups)
    assert not torch.isnan(y3).any() and not torch.isnan(mean).any() and not torch.isnan(rstd).any()
    assert torch.allclose(y3.view(x.shape).double(), ref, atol=2e-5, rtol=1e-5)
    if training:
        assert torch.allclose(stats["running_mean"].double(), rm, atol=1e-6)
        assert torch.allclose(stats["running_var"].double(), rv, atol=1e-6)
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))
    out = launch_backward(x3, dy.view_as(x3), p, mean, rstd, groups, training, **force)
    assert_gradients(out, x, p, dy, before, groups, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, groups, layout, splits, tile", SPLIT_CASES, ids=str)
def test_split_reductions_with_the_residual_and_relu(shape, groups, layout, splits, tile, training):
    """ReLU(y + r) forward, and backward dx, r's gradient and every per-channel gradient, with
    several splits a group: the mask the backward recomputes from x and r in both of its kernels,
    r's gradient written for every row (NaN-poisoned), r in its own strides (the other layout)."""
    x, p, stats = make_layout(shape, groups, layout)
    r = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) * 2)
    if layout == "nchw":
        r = r.contiguous(memory_format=torch.channels_last)
    x3, r3 = ncs(x), ncs(r)
    force = dict(splits=splits, tile=tile)
    c = x.shape[1]
    y3 = torch.full_like(x3, float("nan"))
    mean = torch.full((groups, c), float("nan"), device=x.device)
    rstd = torch.full_like(mean, float("nan"))
    bn_forward(x3, y3, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], stats["running_mean"],
               stats["running_var"], mean, rstd, groups=groups, training=training, update_running=False,
               momentum=0.1, eps=1e-5, relu=True, residual3=r3, **force)
    r64 = r.double().requires_grad_()

    def forward(*args, **kw):
        return torch.relu(batch_norm(*args, **kw)[0] + r64)
    ref = forward(x, **p, **stats, training=training, groups=groups)
    assert not torch.isnan(y3).any() and torch.allclose(y3.view(x.shape).double(), ref, atol=2e-5, rtol=1e-5)
    assert (ref == 0).any() and (ref > 0).any()
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    out = dict(x=nan(x3), mask=nan(p["mask"]), noise=nan(p["noise"]), noise_bias=nan(p["noise_bias"]),
               weight=nan(p["weight"]), bias=nan(p["bias"]))
    dr3 = nan(r3)
    bn_backward(x3, ncs(dy), out["x"], p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd,
                groups=groups, training=training, dmask=out["mask"], dnoise=out["noise"],
                dnoise_bias=out["noise_bias"], dweight=out["weight"], dbias=out["bias"], relu=True, residual3=r3,
                dresidual3=dr3, **force)
    (dr_ref,) = torch.autograd.grad((ref * dy.double()).sum(), [r64])
    assert not torch.isnan(dr3).any() and torch.allclose(dr3.view(x.shape).double(), dr_ref, atol=1e-6)
    ref_grads = _grads(forward, x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **stats,
                       training=training, groups=groups)
    for k, v in dict(out, x=out["x"].view(x.shape)).items():
        assert not torch.isnan(v).any(), f"d{k} has unwritten elements"
        scale = ref_grads[k].abs().max().item() + 1.0
        assert torch.allclose(v.double(), ref_grads[k], atol=5e-5 * scale, rtol=1e-4), k


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_split_reductions_are_bitwise_deterministic(layout):
    x, p, stats = make_layout((4, 3, 5, 5), 2, layout)
    dy3 = ncs(on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(9))))
    runs = []
    for _ in range(2):
        x3, y3, mean, rstd = launch_forward(x, p, stats, 2, True, update=False, splits=3, tile=(8, 4))
        out = launch_backward(x3, dy3, p, mean, rstd, 2, True, splits=3, tile=(8, 4))
        runs.append([y3, mean, rstd, *out.values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_split_backward_without_dx():
    """The per-channel gradients alone (x needs no gradient) take the small grid of one program
    per channel block; in eval mode dx alone needs no sums at all."""
    x, p, stats = make_layout((6, 5, 7, 5), 2, "nhwc")
    x3, _, mean, rstd = launch_forward(x, p, stats, 2, True, update=False, splits=4, tile=(8, 4))
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))
    ref = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, groups=2)
    dmask, dnoise = torch.full_like(p["mask"], float("nan")), torch.full_like(p["noise"], float("nan"))
    bn_backward(x3, ncs(dy), None, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd,
                groups=2, training=True, dmask=dmask, dnoise=dnoise, splits=4, tile=(8, 4))
    assert torch.allclose(dmask.double(), ref["mask"], atol=1e-4) and torch.allclose(dnoise.double(), ref["noise"],
                                                                                     atol=1e-4)
    x3, _, mean, rstd = launch_forward(x, p, stats, 2, False, update=False, splits=4, tile=(8, 4))
    dx = torch.full_like(x3, float("nan"))
    bn_backward(x3, ncs(dy), dx, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd,
                groups=2, training=False, splits=4, tile=(8, 4))
    ref = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **stats,
                           training=False, groups=2)
    assert torch.allclose(dx.view(x.shape).double(), ref["x"], atol=1e-5)


def test_float64_is_reduced_in_float64():
    x, p, stats = make_layout((6, 5, 7, 5), 2, "nhwc")
    x, p, stats = x.double(), {k: v.double() for k, v in p.items()}, {k: v.double() for k, v in stats.items()}
    ref, _, _ = batch_norm(x, **p, groups=2)
    _, y3, mean, _ = launch_forward(x, p, stats, 2, True, update=False, splits=4, tile=(8, 4))
    assert y3.dtype == mean.dtype == torch.float64
    assert torch.allclose(y3.view(x.shape), ref, atol=1e-12, rtol=1e-12)


def test_plan_follows_the_memory_layout():
    """The contiguous axis is the innermost of every tile: positions for NCHW, channels for
    channels_last and (N, C)."""
    nchw = torch.empty(4, 64, 32, 32)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    plan = lambda x: split_plan(ncs(x), 1, None, None)  # noqa: E731
    assert not plan(nchw).channels_inner and plan(nchw).block_r == 1024  # a tile row: 1024 contiguous positions
    assert plan(nhwc).channels_inner and plan(nhwc).block_c * 4 >= 64  # a tile row: >= 64 contiguous bytes
    assert split_plan(torch.empty(8, 100, 1), 1, None, None).channels_inner


@pytest.mark.parametrize("itemsize", [4, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_plan_fills_an_h100(channels_last, itemsize):
    """At every BatchNorm of the CIFAR ResNet-18 and ResNet-50 (the shapes the sm_90 compile test
    uses), the plan asks for at least one program per SM (132), at most 8 per SM, each reducing
    about 4096 values or more (16 KB of fp32; 3/4 of that after rounding), in tiles whose rows span at least 64 contiguous bytes (a row of positions
    shorter than its tile is followed by the next channel's)."""
    for n, c, side, groups in BN_SHAPES:
        s = side * side
        strides = (s * c, 1, c) if channels_last else (c * s, s, 1)
        plan = launch_plan((n, c, s), strides, groups, SM_COUNT_WITHOUT_GPU, itemsize)
        assert SM_COUNT_WITHOUT_GPU <= plan.programs <= 8 * SM_COUNT_WITHOUT_GPU, (n, c, side, plan)
        assert n * c * s / plan.programs >= 0.75 * BN.MIN_PROGRAM_VALUES, (n, c, side, plan)
        inner = plan.block_c if channels_last else plan.block_r if plan.block_r < s else plan.block_c * s
        assert inner * itemsize >= 64, (n, c, side, plan)


def test_plan_keeps_splits_whole_and_fits_any_shape():
    """Splits cover their group exactly (none empty); the grid is 1-D, so shapes whose channel
    blocks or groups exceed 65535 (the limit of a CUDA grid's second and third dimensions) plan
    like any other."""
    for shape, strides, groups in [((64, 3, 50000), (150000, 50000, 1), 1), ((2, 10**6, 1), (10**6, 1, 1), 1),
                                   ((140000, 8, 1), (8, 1, 1), 70000), ((0, 5, 9), (45, 9, 1), 1)]:
        for splits in (None, 3, 10**6):
            plan = launch_plan(shape, strides, groups, 132, 4, splits=splits)
            (u0, u1), (q, t) = plan.domain, plan.split_size
            assert plan.splits == -(-u0 // q) * plan.splits_s if u0 else plan.splits == 1
            assert plan.splits_s == -(-u1 // t) and plan.programs == groups * plan.splits * plan.channel_blocks
            assert plan.programs < 2**31


def test_sm_count(monkeypatch):
    """Read once per CUDA device; 132 (an H100) without one."""
    assert sm_count(torch.device("cpu")) == sm_count(torch.device("meta")) == SM_COUNT_WITHOUT_GPU == 132
    asked = []

    class Props:
        multi_processor_count = 114

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: asked.append(i) or Props())
    from fastpurify.kernels import runtime

    runtime._cuda_sm_count.cache_clear()
    try:
        assert [sm_count(torch.device("cuda", 1)) for _ in range(3)] == [114] * 3 and asked == [1]
    finally:
        runtime._cuda_sm_count.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("n, c, side, groups", [(256, 64, 32, 2), (128, 512, 4, 1), (128, 2048, 7, 2)])
def test_cuda_at_real_shapes(n, c, side, groups, channels_last):
    """On a GPU, with the device's own plan (hundreds of programs, many splits a group): every
    output written, forward, running statistics and every gradient against the float64
    formulas, and bitwise equal over two runs (what the interpreter cannot show: programs that
    really run at once)."""
    x, p, stats = make((n, c, side, side), groups, channels_last)
    x, p, stats = x.cuda(), {k: v.cuda() for k, v in p.items()}, {k: v.cuda() for k, v in stats.items()}
    x3 = ncs(x)
    plan = launch_plan(tuple(x3.shape), x3.stride(), groups, sm_count(x.device), 4)
    assert plan.splits > 1 and plan.programs >= sm_count(x.device)
    before = {k: v.clone() for k, v in stats.items()}
    dy3 = ncs(torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).cuda())
    runs = []
    for _ in range(2):
        run_stats = {k: v.clone() for k, v in before.items()}
        _, y3, mean, rstd = launch_forward(x, p, run_stats, groups, True, update=True)
        out = launch_backward(x3, dy3, p, mean, rstd, groups, True)
        runs.append([y3, mean, rstd, *run_stats.values(), *out.values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref, rm, rv = batch_norm(x, **p, **before, training=True, groups=groups)
    assert not torch.isnan(y3).any()
    assert torch.allclose(y3.view(x.shape).double(), ref, atol=5e-5, rtol=1e-5)
    assert torch.allclose(run_stats["running_mean"].double(), rm, atol=1e-6)
    assert torch.allclose(run_stats["running_var"].double(), rv, atol=1e-5)
    assert_gradients(out, x, p, dy3.view(x.shape), before, groups, True)
