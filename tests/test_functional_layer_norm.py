"""perturbed_layer_norm through its public function, on both backends (the Triton one through
the interpreter without a GPU), against the float64 formulas: forward and every gradient, every
mode and layout, and its bad input."""

import pytest
import torch
import torch.nn.functional as F

from fastpurify import functional as FP
from fastpurify.validation import InputError

from .devices import TEST_DEVICE, on_device
from .formulas import layer_norm, layer_norm_grads
from .norm_inputs import (arena_views, assert_bitwise_deterministic, assert_every_gradient, detached, inputs,
                          params)

CASES = [  # (shape, channel_dim, groups, channels_last)
    ((3, 7), -1, 1, False),            # 2-D (N, C)
    ((4, 5, 13), -1, 2, False),        # ViT tokens (N, T, C)
    ((2, 3, 3, 17), -1, 2, False),     # Swin's NHWC
    ((4, 17, 5, 3), 1, 2, False),      # ConvNeXt's LayerNorm2d on NCHW
    ((4, 17, 5, 3), 1, 2, True),       # ... channels_last
    ((6, 4, 2, 3), 1, 3, True),
    ((2, 1000), -1, 2, False),         # features in several chunks
]
MODES = {  # which parameters exist and which require grad besides x and the mask
    "noisy": dict(noisy=True, affine=True, weight_grad=False),
    "noisy-trained-affine": dict(noisy=True, affine=True, weight_grad=True),
    "clean-trained-affine": dict(noisy=False, affine=True, weight_grad=True),
    "no-bias": dict(noisy=True, affine="weight", weight_grad=True),
    "no-affine": dict(noisy=True, affine=False, weight_grad=False),
}
ids = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, channel_dim, groups, channels_last", CASES, ids=ids)
def test_forward_and_every_gradient(backend, shape, channel_dim, groups, channels_last, mode):
    x, p = inputs(shape, channels_last), params(shape[channel_dim], groups, **MODES[mode])
    kw = dict(groups=groups, channel_dim=channel_dim)
    y = FP.perturbed_layer_norm(x, **p, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.stride() == x.stride()  # x's memory layout, channels_last included
    assert torch.allclose(y.double(), layer_norm(x.detach(), **detached(p), **kw), atol=2e-5, rtol=1e-5)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    y.backward(dy)
    ref = layer_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **kw)
    assert_every_gradient(dict(x=x, **p), ref)


@pytest.mark.parametrize("channel_dim, shape", [(-1, (4, 3, 5)), (1, (4, 5, 2, 3))])
def test_gradcheck_float64(backend, channel_dim, shape):
    x = inputs(shape, dtype=torch.float64)
    p = params(shape[channel_dim], 2, weight_grad=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: FP.perturbed_layer_norm(*a, groups=2, channel_dim=channel_dim),
                                    (x, *p.values()), fast_mode=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_one_without_noise_is_layer_norm(backend, channels_last):
    """nn.LayerNorm over the last axis; LayerNorm2d as torchvision's ConvNeXt computes it (features
    moved last, F.layer_norm, moved back). Values and input gradients."""
    p = detached(params(6, 1))
    ones = torch.ones(6, device=TEST_DEVICE)
    x = inputs((3, 4, 6))
    y = FP.perturbed_layer_norm(x, p["weight"], p["bias"], ones)
    expected = F.layer_norm(x, (6,), p["weight"], p["bias"])
    assert torch.allclose(y, expected, atol=1e-5)
    dy = on_device(torch.randn(y.shape))
    assert torch.allclose(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(expected, x, dy)[0], atol=1e-5)
    x = inputs((3, 6, 4, 5), channels_last)
    y = FP.perturbed_layer_norm(x, p["weight"], p["bias"], ones, channel_dim=1)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), p["weight"], p["bias"]).permute(0, 3, 1, 2)
    assert torch.allclose(y, expected, atol=1e-5)
    dy = on_device(torch.randn(y.shape))
    assert torch.allclose(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(expected, x, dy)[0], atol=1e-5)


def test_groups_equal_separate_passes(backend):
    x = inputs((6, 5, 7)).detach()
    p = detached(params(7, 3))
    together = FP.perturbed_layer_norm(x, **p, groups=3)
    for g in range(3):
        alone = FP.perturbed_layer_norm(x[2 * g:2 * g + 2], p["weight"], p["bias"], p["mask"], p["noise"][g],
                                        p["noise_bias"][g])
        assert torch.allclose(together[2 * g:2 * g + 2], alone, atol=1e-6)


def test_noise_rows_may_be_strided_views_of_an_arena(backend):
    """Per-layer (groups, C) noise taken from a (groups, 2, P) arena: rows strided by 2P, mask a
    slice of a flat vector; forward and gradients equal those of contiguous copies."""
    c, groups = 5, 2
    x = inputs((4, c, 3, 2)).detach()
    p = detached(params(c, groups))
    mask, noise, noise_bias = arena_views(p, c, groups)
    y = FP.perturbed_layer_norm(x, p["weight"], p["bias"], mask, noise, noise_bias, groups=groups, channel_dim=1)
    ref = FP.perturbed_layer_norm(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], groups=groups,
                                  channel_dim=1)
    assert torch.equal(y, ref)
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
    grads = torch.autograd.grad((y * dy).sum(), [mask, noise, noise_bias])
    expected = layer_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, groups=groups,
                                channel_dim=1)
    for got, key in zip(grads, ("mask", "noise", "noise_bias")):
        assert torch.allclose(got.double(), expected[key], atol=1e-4), key


def test_one_group_noise_as_a_vector(backend):
    x = inputs((5, 3, 4)).detach()
    p = detached(params(4, 1))
    assert torch.equal(FP.perturbed_layer_norm(x, **p), FP.perturbed_layer_norm(
        x, p["weight"], p["bias"], p["mask"], p["noise"][0], p["noise_bias"][0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channel_dim, channels_last", [(-1, False), (1, False), (1, True)])
def test_half_precision_forward(backend, dtype, channel_dim, channels_last):
    shape = (4, 12, 3, 5) if channel_dim == 1 else (4, 3, 12)
    x = inputs(shape, channels_last, dtype).detach()
    p = detached(params(12, 2))
    y = FP.perturbed_layer_norm(x, **p, groups=2, channel_dim=channel_dim)
    assert y.dtype == dtype and y.stride() == x.stride()
    ref = layer_norm(x.double(), **p, groups=2, channel_dim=channel_dim)
    assert torch.allclose(y.double(), ref, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=1e-2)


@pytest.mark.parametrize("channel_dim, channels_last", [(-1, False), (1, True)])
def test_output_may_be_modified_in_place(backend, channel_dim, channels_last):
    """An in-place activation after the LayerNorm: same values and gradients as an out-of-place one."""
    x = inputs((4, 6, 3, 5), channels_last)
    p = params(x.shape[channel_dim], 2)
    grads = []
    for relu in (torch.relu_, torch.relu):
        y = relu(FP.perturbed_layer_norm(x, **p, groups=2, channel_dim=channel_dim))
        grads.append(torch.autograd.grad(y.square().sum(), [x, p["mask"], p["noise"]]))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("make_x, channel_dim", [  # on the device first: moving a strided view makes it contiguous
    # positions don't merge
    (lambda: on_device(torch.randn(4, 5, 6, 7)).contiguous(memory_format=torch.channels_last), -1),
    (lambda: on_device(torch.randn(4, 9, 6))[:, ::2], -1),                       # a strided slice
    (lambda: on_device(torch.randn(4, 10, 3, 3))[:, ::2], 1),
    (lambda: on_device(torch.randn(4, 3, 5)).transpose(1, 2), 1),                # NCL with C contiguous
])
def test_any_layout_of_x_and_dy(backend, make_x, channel_dim):
    x = make_x().requires_grad_()
    p = params(x.shape[channel_dim], 2)
    y = FP.perturbed_layer_norm(x, **p, groups=2, channel_dim=channel_dim)
    kw = dict(groups=2, channel_dim=channel_dim)
    assert torch.allclose(y.double(), layer_norm(x.detach(), **detached(p), **kw), atol=2e-5, rtol=1e-5)
    dy = on_device(torch.randn(x.shape[::-1])).permute(*reversed(range(x.dim())))  # another layout again
    y.backward(dy)
    ref = layer_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **kw)
    for k, t in dict(x=x, mask=p["mask"], noise=p["noise"], noise_bias=p["noise_bias"]).items():
        assert torch.allclose(t.grad.double(), ref[k], atol=1e-4, rtol=1e-4), k


def test_bitwise_deterministic(backend):
    x = inputs((8, 17, 5, 5), True)
    p = params(17, 2)
    assert_bitwise_deterministic(lambda x, **p: FP.perturbed_layer_norm(x, **p, groups=2, channel_dim=1), x, p)


def test_empty_batch(backend):
    y = FP.perturbed_layer_norm(torch.empty(0, 3, 4, device=TEST_DEVICE), None, None,
                                torch.ones(4, device=TEST_DEVICE))
    assert y.shape == (0, 3, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=[[1.0, 2.0, 3.0]]), r"x must be a tensor \(N, \.\.\., C\).* got list"),
    (dict(x=torch.tensor(1.0)), r"x must be a tensor .* got shape \(\)"),
    (dict(x=torch.ones(3)), r"x must be a tensor .* got shape \(3,\)"),
    (dict(x=torch.ones(6, 4, 3, dtype=torch.int64)), "x must be a floating tensor"),
    (dict(channel_dim=0), r"channel_dim must be -1 or 2 \(the last axis.*or 1 \(the channels of NCHW"),
    (dict(channel_dim=-2), "channel_dim must be -1 or 2"),
    (dict(channel_dim=True), "channel_dim must be"),
    (dict(mask=None), "mask must be a tensor, got NoneType"),
    (dict(mask=torch.ones(4)), r"mask must have shape \(3,\) for 3 features, got \(4,\)"),
    (dict(mask=torch.ones(3, dtype=torch.int32)), "mask must be a floating tensor"),
    (dict(weight=torch.ones(3, 1)), r"weight must have shape \(3,\)"),
    (dict(bias=torch.ones(2)), r"bias must have shape \(3,\)"),
    (dict(noise=torch.zeros(3)), r"noise must have shape \(2, 3\) \(groups, channels\)"),
    (dict(noise_bias=torch.zeros(3, 3)), r"noise_bias must have shape \(2, 3\)"),
    (dict(noise=0.1), "noise must be a tensor or None"),
    (dict(groups=4), "groups must be a positive integer dividing the batch size 6, got 4"),
    (dict(groups=0), "groups must be a positive integer"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-1e-5), "eps"),
    (dict(mask=torch.ones(3, device="meta")), "one device"),
])
def test_clear_errors(backend, kwargs, message):
    args = dict(x=torch.randn(6, 4, 3), weight=torch.ones(3), bias=torch.zeros(3), mask=torch.ones(3),
                noise=torch.zeros(2, 3), groups=2)
    args.update(kwargs)
    args = {k: on_device(v) if isinstance(v, torch.Tensor) and not v.is_meta else v for k, v in args.items()}
    with pytest.raises(InputError, match=message):
        FP.perturbed_layer_norm(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, channel_dim, channels_last", [((16, 197, 384), -1, False),
                                                               ((16, 96, 14, 14), 1, False),
                                                               ((16, 96, 14, 14), 1, True),
                                                               ((8, 1536), -1, False)])
def test_cuda_matches_reference(shape, channel_dim, channels_last):
    x = inputs(shape, channels_last).detach().cuda().requires_grad_()
    p = {k: v.detach().cuda().requires_grad_() for k, v in params(shape[channel_dim], 2).items()}
    y = FP.perturbed_layer_norm(x, **p, groups=2, channel_dim=channel_dim)
    assert FP.backend_for(x) == "triton" and y.stride() == x.stride()
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    kw = dict(groups=2, channel_dim=channel_dim)
    assert torch.allclose(cpu(y).double(), layer_norm(cpu(x), **{k: cpu(v) for k, v in p.items()}, **kw),
                          atol=5e-5, rtol=1e-5)
    dy = torch.randn(shape, device="cuda")
    y.backward(dy)
    ref = layer_norm_grads(cpu(x), *(cpu(p[k]) for k in ("weight", "bias", "mask", "noise", "noise_bias")), cpu(dy),
                           **kw)
    for k, t in dict(x=x, **p).items():
        scale = ref[k].abs().max().item() + 1.0
        assert torch.allclose(cpu(t.grad).double(), ref[k], atol=1e-4 * scale, rtol=1e-4), k
