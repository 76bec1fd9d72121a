"""The BatchNorm kernels called directly, outputs poisoned with NaN before each launch so that an
element the kernel fails to write is caught; checked against the float64 formulas."""

import pytest
import torch

from fastpurify.kernels.batch_norm import bn_backward, bn_forward, tile_shape

from ..devices import TEST_DEVICE, on_device
from ..formulas import batch_norm, batch_norm_grads, random_bn_params, random_running_stats

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


def launch_forward(x, p, stats, groups, training, update):
    c = x.shape[1]
    x3 = x.view(x.shape[0], c, -1)
    y3 = torch.full_like(x3, float("nan"))
    mean = torch.full((groups, c), float("nan"), device=TEST_DEVICE)
    rstd = torch.full((groups, c), float("nan"), device=TEST_DEVICE)
    bn_forward(x3, y3, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], stats["running_mean"],
               stats["running_var"], mean, rstd, groups=groups, training=training, update_running=update,
               momentum=0.1, eps=1e-5)
    return x3, y3, mean, rstd


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
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    out = dict(dx=nan(x3), dmask=nan(p["mask"]), dnoise=nan(p["noise"]), dnoise_bias=nan(p["noise_bias"]),
               dweight=nan(p["weight"]), dbias=nan(p["bias"]))
    bn_backward(x3, dy.view_as(x3), out["dx"], p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"],
                mean, rstd, groups=groups, training=training, dmask=out["dmask"], dnoise=out["dnoise"],
                dnoise_bias=out["dnoise_bias"], dweight=out["dweight"], dbias=out["dbias"])
    ref = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **stats,
                           training=training, groups=groups)
    got = dict(x=out["dx"].view(shape), mask=out["dmask"], noise=out["dnoise"], noise_bias=out["dnoise_bias"],
               weight=out["dweight"], bias=out["dbias"])
    for k, v in got.items():
        assert not torch.isnan(v).any(), f"d{k} has unwritten elements"
        scale = ref[k].abs().max().item() + 1.0
        assert torch.allclose(v.double(), ref[k], atol=5e-5 * scale, rtol=1e-4), k


def test_backward_skips_what_is_not_asked():
    x, p, stats = make((6, 5, 4, 4), 2, False)
    x3, _, mean, rstd = launch_forward(x, p, stats, 2, True, update=False)
    dx = torch.full_like(x3, float("nan"))
    dmask = torch.full_like(p["mask"], float("nan"))
    dy3 = on_device(torch.randn(x3.shape))
    bn_backward(x3, dy3, dx, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd, groups=2,
                training=True, dmask=dmask)
    assert not torch.isnan(dx).any() and not torch.isnan(dmask).any()


def test_tiles_follow_the_memory_layout():
    nchw = torch.empty(4, 64, 8, 8, device=TEST_DEVICE).view(4, 64, -1)
    nhwc = torch.empty(4, 64, 8, 8, device=TEST_DEVICE).contiguous(memory_format=torch.channels_last).view(4, 64, -1)
    assert tile_shape(nchw, 64, 256)[1] == 1  # one channel a program, reading along the spatial axis
    assert tile_shape(nhwc, 64, 256)[1] == 64  # many channels a program, reading rows of channels
