"""perturbed_batch_norm through its public function, on both backends (the Triton one through
the interpreter without a GPU), against the float64 formulas."""

import re

import pytest
import torch

from fastpurify import functional as FP
from fastpurify.validation import InputError

from .devices import TEST_DEVICE, cpu_only, on_device
from .formulas import _grads, batch_norm, batch_norm_grads, random_running_stats
from .norm_inputs import arena_views, assert_bitwise_deterministic, assert_every_gradient, detached, inputs, params

SHAPES = [  # (shape, groups, training, channels_last)
    ((6, 3), 1, True, False),
    ((6, 17), 3, True, False),
    ((4, 65, 7, 7), 2, True, False),
    ((4, 17, 9, 13), 2, True, True),
    ((3, 3, 1, 1), 3, False, False),
    ((1, 17, 7, 7), 1, False, True),
    ((2, 5, 1, 1), 1, True, False),
    ((4, 3, 2, 3, 2), 2, True, False),  # a 5-D input: the spatial axes are merged
]


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("shape, groups, training, channels_last", SHAPES)
def test_forward_and_every_gradient(backend, shape, groups, training, channels_last, weight_grad):
    c = shape[1]
    x, p = inputs(shape, channels_last), params(c, groups, weight_grad=weight_grad)
    s = random_running_stats(c)
    ref_stats = {k: v.clone() for k, v in s.items()}
    y = FP.perturbed_batch_norm(x, **p, **s, training=training, groups=groups)
    ref, rm, rv = batch_norm(x.detach(), **detached(p), **ref_stats, training=training, groups=groups)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.dim() == 4 and shape[2] * shape[3] > 1:  # the memory format is kept
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(y.double(), ref, atol=2e-5, rtol=1e-5)
    if training:
        assert torch.allclose(s["running_mean"].double(), rm, atol=1e-6)
        assert torch.allclose(s["running_var"].double(), rv, atol=1e-6)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    after_forward = {k: v.clone() for k, v in s.items()}
    y.backward(dy)
    assert all(torch.equal(s[k], after_forward[k]) for k in s), "the backward must not touch running stats"
    ref_grads = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy,
                                 **ref_stats, training=training, groups=groups)
    assert_every_gradient(dict(x=x, **p), ref_grads)
    assert (p["weight"].grad is not None) == weight_grad


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("shape, groups, training, channels_last", SHAPES)
def test_fused_relu_forward_and_every_gradient(backend, shape, groups, training, channels_last, weight_grad):
    """``relu=True`` is ReLU(BatchNorm): the output and every gradient against the float64 formula
    followed by ReLU (the kernels recompute where the output is positive from x in the backward)."""
    c = shape[1]
    x, p = inputs(shape, channels_last), params(c, groups, weight_grad=weight_grad)
    s = random_running_stats(c)
    ref_stats = {k: v.clone() for k, v in s.items()}
    y = FP.perturbed_batch_norm(x, **p, **s, training=training, groups=groups, relu=True)
    ref = torch.relu(batch_norm(x.detach(), **detached(p), **ref_stats, training=training, groups=groups)[0])
    assert torch.allclose(y.double(), ref, atol=2e-5, rtol=1e-5)
    assert (y == 0).any() and (y > 0).any()  # the ReLU cuts somewhere and passes somewhere
    if x.dim() == 4 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    y.backward(dy)

    def relu_of_batch_norm(*args, **kw):
        return torch.relu(batch_norm(*args, **kw)[0])
    ref_grads = _grads(relu_of_batch_norm, x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy,
                       **ref_stats, training=training, groups=groups)
    assert_every_gradient(dict(x=x, **p), ref_grads)


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("shape, groups, training, channels_last", SHAPES)
def test_fused_residual_and_relu_forward_and_every_gradient(backend, shape, groups, training, channels_last,
                                                            weight_grad):
    """``residual=r`` is ReLU(BatchNorm(x) + r), a ResNet block's end: the output and every
    gradient, r's too, against the float64 formula (r in the other layout where there is one: the
    kernels take each tensor's own strides)."""
    c = shape[1]
    x, p = inputs(shape, channels_last), params(c, groups, weight_grad=weight_grad)
    r = inputs(shape, channels_last=len(shape) == 4 and not channels_last, seed=7)
    s = random_running_stats(c)
    ref_stats = {k: v.clone() for k, v in s.items()}
    y = FP.perturbed_batch_norm(x, **p, **s, training=training, groups=groups, relu=True, residual=r)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    y.backward(dy)
    r64 = r.detach().double().requires_grad_()

    def relu_of_batch_norm_plus_r(*args, **kw):
        return torch.relu(batch_norm(*args, **kw)[0] + r64)
    ref = relu_of_batch_norm_plus_r(x.detach(), **detached(p), **{k: v.clone() for k, v in ref_stats.items()},
                                    training=training, groups=groups)
    assert torch.allclose(y.double(), ref, atol=2e-5, rtol=1e-5)
    assert (y == 0).any() and (y > 0).any()
    if x.dim() == 4 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # x's layout, not r's
    (dr_ref,) = torch.autograd.grad((ref * dy.double()).sum(), [r64])
    ref_grads = _grads(relu_of_batch_norm_plus_r, x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"],
                       dy, **ref_stats, training=training, groups=groups)
    assert_every_gradient(dict(x=x, r=r, **p), dict(ref_grads, r=dr_ref))
    assert r.grad.shape == r.shape and r.grad.stride() == r.stride()


def test_the_residual_alone_gets_its_gradient(backend):
    """x needs no gradient (a frozen first layer, say): the kernels still write r's."""
    x, p = inputs((4, 5, 6, 6)).detach(), detached(params(5, 2, noisy=True))
    r = inputs((4, 5, 6, 6), seed=7)
    y = FP.perturbed_batch_norm(x, **p, groups=2, relu=True, residual=r)
    dy = on_device(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    y.backward(dy)
    torch.testing.assert_close(r.grad, dy * (y > 0))


@pytest.mark.parametrize("residual, message", [
    ("no relu", "residual is taken with relu=True only"),
    (torch.zeros(4, 5, 6), "residual must be a tensor of x's shape, dtype and device ((4, 5, 6, 6) torch.float32"),
    (torch.zeros(4, 5, 6, 6, dtype=torch.float64), "got (4, 5, 6, 6) torch.float64"),
    ("a string", "got str"),
])
def test_a_bad_residual_is_a_clear_error(residual, message):
    x = on_device(torch.randn(4, 5, 6, 6))
    relu = residual != "no relu"
    r = on_device(torch.zeros_like(x)) if residual == "no relu" else (
        on_device(residual) if isinstance(residual, torch.Tensor) else residual)
    with pytest.raises(InputError, match=re.escape(message)):
        FP.perturbed_batch_norm(x, None, None, on_device(torch.ones(5)), relu=relu, residual=r)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_relu_treats_nan_as_torch_relu(channels_last, monkeypatch):
    """A NaN input: NaN out of the ReLU (not 0), and the gradient through it as PyTorch's ReLU
    backward gives it (zeroed only where the output is <= 0): both backends alike."""
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTPURIFY_BACKEND", backend)
        x = inputs((4, 3, 5, 5), channels_last).detach().clone()
        x[1, 2, 3, 4] = float("nan")
        x.requires_grad_()
        y = FP.perturbed_batch_norm(x, **detached(params(3, 1, noisy=False)), **random_running_stats(3),
                                    training=False, relu=True)
        y.backward(torch.ones_like(y))
        runs[backend] = (y.detach(), x.grad)
    (y_t, g_t), (y_k, g_k) = runs["torch"], runs["triton"]
    assert torch.isnan(y_k[1, 2, 3, 4]) and torch.equal(torch.isnan(y_k), torch.isnan(y_t))
    assert torch.allclose(y_k, y_t, equal_nan=True, atol=1e-6) and torch.allclose(g_k, g_t, atol=1e-6)
    assert g_k[1, 2, 3, 4] != 0 and (g_k == 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_forward(backend, dtype, channels_last):
    shape = (4, 17, 9, 13)
    x = inputs(shape, channels_last, dtype).detach()
    p = detached(params(17, 2))
    y = FP.perturbed_batch_norm(x, **p, groups=2)
    ref, _, _ = batch_norm(x.double(), **p, groups=2)
    assert y.dtype == dtype
    assert torch.allclose(y.double(), ref, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=1e-2)


def test_groups_equal_separate_passes(backend):
    x = inputs((6, 5, 4, 4), False).detach()
    p = detached(params(5, 3))
    together = FP.perturbed_batch_norm(x, **p, groups=3)
    for g in range(3):
        alone = FP.perturbed_batch_norm(x[2 * g:2 * g + 2], p["weight"], p["bias"], p["mask"], p["noise"][g],
                                        p["noise_bias"][g])
        assert torch.allclose(together[2 * g:2 * g + 2], alone, atol=1e-6)


def test_one_group_noise_as_a_vector_and_no_noise(backend):
    x = inputs((5, 4, 3, 3), False).detach()
    p = detached(params(4, 1))
    assert torch.allclose(FP.perturbed_batch_norm(x, **p), FP.perturbed_batch_norm(
        x, p["weight"], p["bias"], p["mask"], p["noise"][0], p["noise_bias"][0]))
    plain = FP.perturbed_batch_norm(x, p["weight"], p["bias"], torch.ones(4, device=TEST_DEVICE))
    expected = torch.nn.functional.batch_norm(x, None, None, p["weight"], p["bias"], True)
    assert torch.allclose(plain, expected, atol=1e-5)


def test_noise_rows_may_be_strided_views_of_an_arena(backend):
    """Per-layer (groups, C) noise taken from a (groups, 2, P) arena: rows strided by 2P, mask a
    slice of a flat vector; forward and gradients equal those of contiguous copies."""
    c, groups = 5, 2
    x = inputs((6, c, 3, 4), False).detach()
    p = detached(params(c, groups))
    mask, noise, noise_bias = arena_views(p, c, groups)
    y = FP.perturbed_batch_norm(x, p["weight"], p["bias"], mask, noise, noise_bias, groups=groups)
    ref = FP.perturbed_batch_norm(x, p["weight"], p["bias"], *[t.clone().requires_grad_() for t in
                                                               (p["mask"], p["noise"], p["noise_bias"])],
                                  groups=groups)
    assert torch.equal(y, ref)
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
    grads = torch.autograd.grad((y * dy).sum(), [mask, noise, noise_bias])
    expected = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy,
                                training=True, groups=groups)
    for got, key in zip(grads, ("mask", "noise", "noise_bias")):
        assert torch.allclose(got.double(), expected[key], atol=1e-4), key


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_may_be_modified_in_place(backend, channels_last):
    """ReLU(inplace=True) after the BatchNorm, as in torchvision's ResNets: same values and
    gradients as an out-of-place ReLU."""
    x = inputs((4, 6, 3, 5), channels_last)
    p = params(6, 1)
    grads = []
    for relu in (torch.relu_, torch.relu):
        y = relu(FP.perturbed_batch_norm(x, **p))
        grads.append(torch.autograd.grad(y.square().sum(), [x, p["mask"], p["noise"]]))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_bitwise_deterministic(backend):
    x = inputs((8, 17, 5, 5), True)
    p = params(17, 2)
    assert_bitwise_deterministic(lambda x, **p: FP.perturbed_batch_norm(x, **p, groups=2), x, p)


def test_gradcheck_float64(backend):
    x = on_device(torch.randn(4, 3, 2, 3, dtype=torch.float64)).requires_grad_()
    g = torch.Generator().manual_seed(0)
    w = on_device(torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = on_device(torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    m = on_device(torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_()
    n = on_device(torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    nb = on_device(torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: FP.perturbed_batch_norm(*a, groups=2), (x, w, b, m, n, nb),
                                    fast_mode=True)
    rm = torch.zeros(3, dtype=torch.float64, device=TEST_DEVICE)
    rv = torch.ones(3, dtype=torch.float64, device=TEST_DEVICE)
    assert torch.autograd.gradcheck(
        lambda *a: FP.perturbed_batch_norm(*a, running_mean=rm, running_var=rv, training=False, groups=2),
        (x, w, b, m, n, nb), fast_mode=True)


def test_dy_in_another_layout(backend):
    x = inputs((4, 6, 5, 5), True)
    p = params(6, 2)
    y = FP.perturbed_batch_norm(x, **p, groups=2)
    dy = on_device(torch.randn(4, 6, 5, 5))  # contiguous while x is channels_last
    y.backward(dy)
    ref = batch_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, groups=2)
    assert torch.allclose(x.grad.double(), ref["x"], atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=torch.ones(4)), r"mask must have shape \(3,\)"),
    (dict(groups=4), "groups must be a positive integer dividing the batch size 6"),
    (dict(noise=torch.zeros(3)), r"noise must have shape \(2, 3\)"),
    (dict(x=torch.ones(6, 3, 4, 4, dtype=torch.int64)), "x must be a floating tensor"),
    (dict(x=torch.randn(2, 3, 1, 1)), "more than one value per channel"),
    (dict(training=False), "give running_mean and running_var"),
    (dict(x=torch.randn(3)), r"\(N, C\)"),
    (dict(mask=torch.ones(3, device="meta")), "one device"),
])
def test_clear_errors(backend, kwargs, message):
    args = dict(x=torch.randn(6, 3, 4, 4), weight=torch.ones(3), bias=torch.zeros(3), mask=torch.ones(3),
                noise=torch.zeros(2, 3), groups=2)
    args.update(kwargs)
    args = {k: on_device(v) if isinstance(v, torch.Tensor) and not v.is_meta else v for k, v in args.items()}
    with pytest.raises(InputError, match=message):
        FP.perturbed_batch_norm(**args)


@cpu_only
def test_backend_choice(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")
    assert FP.backend_for(x) == "torch"
    monkeypatch.setenv("FASTPURIFY_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert FP.backend_for(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert FP.backend_for(x) == "torch"
    monkeypatch.setenv("FASTPURIFY_BACKEND", "triton")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        FP.backend_for(x)
    monkeypatch.setenv("FASTPURIFY_BACKEND", "cuda")
    with pytest.raises(InputError, match="FASTPURIFY_BACKEND must be one of"):
        FP.backend_for(x)


@pytest.mark.gpu
def test_cuda_matches_reference():
    torch.backends.cudnn.allow_tf32 = False
    x = inputs((16, 64, 8, 8), True).detach().cuda().requires_grad_()
    p = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in params(64, 2).items()}
    y = FP.perturbed_batch_norm(x, **p, groups=2)
    ref, _, _ = batch_norm(x.detach().cpu(), **{k: v.detach().cpu() for k, v in p.items()}, groups=2)
    assert torch.allclose(y.double().cpu(), ref, atol=2e-5, rtol=1e-5)
    assert FP.backend_for(x) == "triton"
