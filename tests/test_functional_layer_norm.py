"""``perturbed_layer_norm`` on both backends (the Triton kernels through the interpreter) against
the float64 formula, forward and backward, every mode and layout, and its bad input."""

import pytest
import torch
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify.functional import perturbed_layer_norm

from .formulas import layer_norm

CASES = [  # (shape, channel_dim, groups, channels_last)
    ((3, 7), -1, 1, False),            # 2-D (N, C)
    ((4, 5, 13), -1, 2, False),        # ViT tokens (N, T, C)
    ((2, 3, 3, 17), -1, 2, False),     # Swin NHWC
    ((4, 17, 5, 3), 1, 2, False),      # ConvNeXt LayerNorm2d on NCHW
    ((4, 17, 5, 3), 1, 2, True),       # ... channels_last
    ((6, 4, 2, 3), 1, 3, True),
    ((2, 1000), -1, 2, False),         # several feature blocks
]


def make(shape, channel_dim, groups, channels_last, noisy=True, affine=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = shape[channel_dim]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rand = lambda *s: torch.rand(*s, generator=g).to(dtype)  # noqa: E731
    p = dict(weight=rand(c) + 0.5 if affine else None, bias=rand(c) - 0.5 if affine else None, mask=rand(c),
             noise=rand(groups, c) * 0.8 - 0.4 if noisy else None,
             noise_bias=rand(groups, c) * 0.8 - 0.4 if noisy and affine else None)
    return x, p


def grads(fn, x, p, dy):
    leaves = [x] + [t for t in p.values() if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    y = fn(x, **p)
    return y, torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("noisy, affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape, channel_dim, groups, channels_last", CASES)
def test_forward_and_backward_equal_the_float64_formula(backend, shape, channel_dim, groups, channels_last, noisy,
                                                        affine):
    x, p = make(shape, channel_dim, groups, channels_last, noisy, affine)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    kw = dict(groups=groups, channel_dim=channel_dim)
    y, got = grads(lambda x, **p: perturbed_layer_norm(x, **p, **kw), x, p, dy)
    ref_x, ref_p = x.detach().double(), {k: None if v is None else v.detach().double() for k, v in p.items()}
    ref, want = grads(lambda x, **p: layer_norm(x, **p, **kw), ref_x, ref_p, dy.double())
    assert y.dtype == x.dtype and y.stride() == x.stride()  # x's dtype and layout
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * (1 + float(b.abs().max())))


@pytest.mark.parametrize("channel_dim, shape", [(-1, (4, 3, 5)), (1, (4, 5, 2, 3))])
def test_gradcheck_in_float64(backend, channel_dim, shape):
    x, p = make(shape, channel_dim, 2, False, dtype=torch.float64)
    leaves = [x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"]]
    for t in leaves:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda *t: perturbed_layer_norm(*t, groups=2, channel_dim=channel_dim), leaves, eps=1e-6, atol=1e-6)


def test_mask_one_without_noise_is_layer_norm(backend):
    x, p = make((3, 4, 6), -1, 1, False, noisy=False)
    y = perturbed_layer_norm(x, p["weight"], p["bias"], torch.ones(6))
    torch.testing.assert_close(y, F.layer_norm(x, (6,), p["weight"], p["bias"]), rtol=1e-5, atol=1e-5)


def test_weights_without_grad_get_none_and_bias_none_is_zero(backend):
    x, p = make((4, 6), -1, 2, False)
    p["weight"].requires_grad_(False)
    x.requires_grad_(True)
    p["mask"].requires_grad_(True)
    y = perturbed_layer_norm(x, p["weight"], None, p["mask"], p["noise"], None, groups=2)
    ref = layer_norm(x.detach(), p["weight"], None, p["mask"].detach(), p["noise"], None, groups=2)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5)
    y.sum().backward()
    assert x.grad is not None and p["mask"].grad is not None and p["weight"].grad is None


@pytest.mark.parametrize("kw, message", [
    (dict(x=torch.ones(3)), r"x must be a tensor \(N, \.\.\., C\)"),
    (dict(x=torch.ones(2, 3, dtype=torch.int64)), "x must be a floating tensor"),
    (dict(channel_dim=0), "channel_dim must be -1"),
    (dict(groups=3), "groups must be a positive integer dividing the batch size 4"),
    (dict(eps=0.0), "eps"),
    (dict(mask=torch.ones(4)), r"mask must have shape \(3,\) for 3 features"),
    (dict(noise=torch.ones(3, 3)), r"noise must have shape \(2, 3\)"),
])
def test_bad_input_is_refused(kw, message):
    args = dict(x=torch.ones(4, 3), weight=None, bias=None, mask=torch.ones(3), noise=None, noise_bias=None,
                eps=1e-5, groups=2, channel_dim=-1)
    args.update(kw)
    with pytest.raises(InputError, match=message):
        perturbed_layer_norm(**args)
