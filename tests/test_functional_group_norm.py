"""perturbed_group_norm through its public function, on both backends (the Triton one through the
interpreter without a GPU), against the float64 formulas: forward and every gradient, layouts and
affine modes; the PyTorch path bit for bit F.group_norm when nothing is masked or perturbed; and
its bad input."""

import pytest
import torch
import torch.nn.functional as F

from fastpurify import functional as FP
from fastpurify.validation import InputError

from .devices import TEST_DEVICE, on_device
from .formulas import group_norm, group_norm_grads
from .norm_inputs import (arena_views, assert_bitwise_deterministic, assert_every_gradient, detached, inputs,
                          params)

CASES = [  # (shape, num_groups, groups, channels_last)
    ((3, 6), 3, 3, False),             # 2-D (N, C)
    ((2, 6, 3, 5), 1, 2, False),       # PoolFormer's GroupNorm(1, C), ANP's two batch groups
    ((2, 6, 3, 5), 2, 2, True),        # channels_last
    ((2, 3, 1, 1), 3, 1, False),       # num_groups = C on 1x1: xhat = 0, y = shift
]
MODES = {  # which parameters exist and which require grad besides x and the mask
    "noisy": dict(noisy=True, affine=True, weight_grad=False),
    "clean-trained-affine": dict(noisy=False, affine=True, weight_grad=True),
    "no-affine": dict(noisy=True, affine=False, weight_grad=False),
}
ids = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, num_groups, groups, channels_last", CASES, ids=ids)
def test_forward_and_every_gradient(backend, shape, num_groups, groups, channels_last, mode):
    x, p = inputs(shape, channels_last), params(shape[1], groups, **MODES[mode])
    kw = dict(num_groups=num_groups, groups=groups)
    y = FP.perturbed_group_norm(x, **p, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.stride() == x.stride()  # x's memory layout, channels_last included
    assert torch.allclose(y.double(), group_norm(x.detach(), **detached(p), **kw), atol=2e-5, rtol=1e-5)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    y.backward(dy)
    ref = group_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, **kw)
    assert_every_gradient(dict(x=x, **p), ref)  # frozen weights get none


def test_gradcheck_float64(backend):
    x = inputs((2, 4, 3), dtype=torch.float64)
    p = params(4, 2, weight_grad=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: FP.perturbed_group_norm(*a, num_groups=2, groups=2),
                                    (x, *p.values()), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, num_groups, channels_last", [((3, 6, 4, 5), 2, False), ((3, 6, 4, 5), 3, True),
                                                              ((4, 12), 2, False), ((2, 4, 7), 1, False)], ids=ids)
def test_torch_path_is_group_norm_bit_for_bit(monkeypatch, shape, num_groups, channels_last, dtype):
    """Mask 1, no noise: the PyTorch path is F.group_norm itself on x's NCHW-contiguous copy
    (values and input gradients) for a given weight and bias; without them (the mask then is
    F.group_norm's weight, which rounds differently from none) and on the Triton path it agrees
    to rounding."""
    x = inputs(shape, channels_last, dtype)
    p = detached(params(shape[1], 1, dtype=dtype))
    ones = torch.ones(shape[1], dtype=dtype, device=TEST_DEVICE)
    dy = on_device(torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(3)))
    for weight, bias in ((p["weight"], p["bias"]), (None, None)):
        expected = F.group_norm(x.contiguous(), num_groups, weight, bias, 1e-5)
        expected_dx = torch.autograd.grad(expected, x, dy)[0]
        monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")
        y = FP.perturbed_group_norm(x, weight, bias, ones, num_groups=num_groups)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert y.stride() == x.stride()
        if weight is not None:
            assert torch.equal(y, expected)
            assert torch.equal(torch.autograd.grad(y, x, dy)[0], expected_dx)
        else:
            assert torch.allclose(y, expected, atol=tol)
            assert torch.allclose(torch.autograd.grad(y, x, dy)[0], expected_dx, atol=tol)
        monkeypatch.setenv("FASTPURIFY_BACKEND", "triton")
        y = FP.perturbed_group_norm(x, weight, bias, ones, num_groups=num_groups)
        assert torch.allclose(y, expected, atol=tol) and y.stride() == x.stride()
        assert torch.allclose(torch.autograd.grad(y, x, dy)[0], expected_dx, atol=tol)


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_channels_last_without_the_input_gradient(backend, x_requires_grad):
    """Only the mask's gradient asked for, x channels_last (ANP's first norm layer on the CPU's
    default layout): F.group_norm's CPU backward would crash here; the path gives x's layout and
    the gradient of the NCHW computation."""
    x = inputs((4, 8, 5, 5), channels_last=True).detach().requires_grad_(x_requires_grad)
    p = params(8, 1)
    y = FP.perturbed_group_norm(x, **p, num_groups=2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (dmask,) = torch.autograd.grad(y.square().sum(), p["mask"])
    flat = FP.perturbed_group_norm(x.contiguous(), **p, num_groups=2)
    assert torch.allclose(y, flat, atol=1e-5)
    assert torch.allclose(dmask, torch.autograd.grad(flat.square().sum(), p["mask"])[0], atol=1e-4)


def test_groups_equal_separate_passes(backend):
    x = inputs((6, 4, 3, 2)).detach()
    p = detached(params(4, 3))
    together = FP.perturbed_group_norm(x, **p, num_groups=2, groups=3)
    for g in range(3):
        alone = FP.perturbed_group_norm(x[2 * g:2 * g + 2], p["weight"], p["bias"], p["mask"], p["noise"][g],
                                        p["noise_bias"][g], num_groups=2)
        assert torch.allclose(together[2 * g:2 * g + 2], alone, atol=1e-6)


def test_noise_rows_may_be_strided_views_of_an_arena(backend):
    """Per-layer (groups, C) noise taken from a (groups, 2, P) arena: rows strided by 2P, mask a
    slice of a flat vector; forward and gradients equal those of contiguous copies."""
    c, groups = 6, 2
    x = inputs((4, c, 3, 2)).detach()
    p = detached(params(c, groups))
    mask, noise, noise_bias = arena_views(p, c, groups)
    y = FP.perturbed_group_norm(x, p["weight"], p["bias"], mask, noise, noise_bias, num_groups=3, groups=groups)
    ref = FP.perturbed_group_norm(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], num_groups=3,
                                  groups=groups)
    assert torch.equal(y, ref)
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
    grads = torch.autograd.grad((y * dy).sum(), [mask, noise, noise_bias])
    expected = group_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, num_groups=3,
                                groups=groups)
    for got, key in zip(grads, ("mask", "noise", "noise_bias")):
        assert torch.allclose(got.double(), expected[key], atol=1e-4), key


def test_one_group_noise_as_a_vector(backend):
    x = inputs((3, 4, 2, 2)).detach()
    p = detached(params(4, 1))
    assert torch.equal(FP.perturbed_group_norm(x, **p, num_groups=2), FP.perturbed_group_norm(
        x, p["weight"], p["bias"], p["mask"], p["noise"][0], p["noise_bias"][0], num_groups=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(backend, dtype):
    x = inputs((2, 6, 3, 5), True, dtype).detach()
    p = detached(params(6, 2))
    y = FP.perturbed_group_norm(x, **p, num_groups=3, groups=2)
    assert y.dtype == dtype and y.stride() == x.stride()
    ref = group_norm(x.double(), **p, num_groups=3, groups=2)
    assert torch.allclose(y.double(), ref, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=1e-2)


def test_output_may_be_modified_in_place_and_any_layout_of_x(backend):
    """An in-place activation after the GroupNorm gives the gradients of an out-of-place one; a
    strided slice of x (not dense) is accepted, y dense."""
    x = inputs((4, 6, 3, 5), True)
    p = params(6, 2)
    grads = []
    for relu in (torch.relu_, torch.relu):
        y = relu(FP.perturbed_group_norm(x, **p, num_groups=2, groups=2))
        grads.append(torch.autograd.grad(y.square().sum(), [x, p["mask"], p["noise"]]))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    x = on_device(torch.randn(4, 12, 3, 5))[:, ::2].requires_grad_()
    y = FP.perturbed_group_norm(x, **p, num_groups=3, groups=2)
    assert torch.allclose(y.double(), group_norm(x.detach(), **detached(p), num_groups=3, groups=2), atol=2e-5)


def test_bitwise_deterministic(backend):
    x = inputs((4, 6, 5, 5), True)
    p = params(6, 2)
    assert_bitwise_deterministic(lambda x, **p: FP.perturbed_group_norm(x, **p, num_groups=3, groups=2), x, p)


def test_empty_batch(backend):
    y = FP.perturbed_group_norm(torch.empty(0, 4, 3, device=TEST_DEVICE), None, None,
                                torch.ones(4, device=TEST_DEVICE), num_groups=2)
    assert y.shape == (0, 4, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=[[1.0, 2.0, 3.0]]), r"x must be a tensor \(N, C\) or \(N, C, \*spatial\), got list"),
    (dict(x=torch.ones(6)), r"x must be a tensor \(N, C\).* got shape \(6,\)"),
    (dict(x=torch.ones(6, 4, 3, dtype=torch.int64)), "x must be a floating tensor"),
    (dict(num_groups=3), r"num_groups must be a positive integer dividing the 4 channels of x \(dim 1\), got 3"),
    (dict(num_groups=0), "num_groups must be a positive integer dividing the 4 channels"),
    (dict(num_groups=2.0), "num_groups must be a positive integer"),
    (dict(mask=None), "mask must be a tensor, got NoneType"),
    (dict(mask=torch.ones(3)), r"mask must have shape \(4,\) for 4 channels, got \(3,\)"),
    (dict(weight=torch.ones(4, 1)), r"weight must have shape \(4,\) for 4 channels"),
    (dict(bias=torch.ones(2)), r"bias must have shape \(4,\)"),
    (dict(noise=torch.zeros(4)), r"noise must have shape \(2, 4\) \(groups, channels\), got \(4,\)"),
    (dict(noise_bias=torch.zeros(3, 4)), r"noise_bias must have shape \(2, 4\)"),
    (dict(noise=0.1), "noise must be a tensor or None"),
    (dict(groups=4), "groups must be a positive integer dividing the batch size 6, got 4"),
    (dict(groups=0), "groups must be a positive integer"),
    (dict(eps=0.0), "eps"),
    (dict(mask=torch.ones(4, device="meta")), "one device"),
])
def test_clear_errors(backend, kwargs, message):
    args = dict(x=torch.randn(6, 4, 3), weight=torch.ones(4), bias=torch.zeros(4), mask=torch.ones(4),
                noise=torch.zeros(2, 4), num_groups=2, groups=2)
    args.update(kwargs)
    args = {k: on_device(v) if isinstance(v, torch.Tensor) and not v.is_meta else v for k, v in args.items()}
    with pytest.raises(InputError, match=message):
        FP.perturbed_group_norm(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, num_groups, channels_last", [((256, 64, 56, 56), 1, False),
                                                              ((256, 64, 56, 56), 1, True),
                                                              ((128, 512, 7, 7), 32, False),
                                                              ((128, 256, 14, 14), 32, True)])
def test_cuda_at_real_shapes(shape, num_groups, channels_last):
    """On a GPU, with the device's own plan (hundreds of programs, split rows): forward and every
    gradient against the float64 formulas, and bitwise equal over two runs (programs that really
    run at once)."""
    x = inputs(shape, channels_last).detach().cuda().requires_grad_()
    p = {k: v.detach().cuda().requires_grad_() for k, v in params(shape[1], 2).items()}
    dy = torch.randn(shape, device="cuda")
    runs = []
    for _ in range(2):
        y = FP.perturbed_group_norm(x, **p, num_groups=num_groups, groups=2)
        runs.append([y.detach(), *torch.autograd.grad(y, [x, *p.values()], dy)])
    assert FP.backend_for(x) == "triton" and runs[0][0].stride() == x.stride()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    kw = dict(num_groups=num_groups, groups=2)
    assert torch.allclose(cpu(runs[0][0]).double(), group_norm(cpu(x), **{k: cpu(v) for k, v in p.items()}, **kw),
                          atol=5e-5, rtol=1e-5)
    ref = group_norm_grads(cpu(x), *(cpu(p[k]) for k in ("weight", "bias", "mask", "noise", "noise_bias")), cpu(dy),
                           **kw)
    for k, got in zip(["x", *p], runs[0][1:]):
        scale = ref[k].abs().max().item() + 1.0
        assert torch.allclose(cpu(got).double(), ref[k], atol=1e-4 * scale, rtol=1e-4), k
