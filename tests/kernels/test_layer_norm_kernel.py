"""The LayerNorm kernels called directly, outputs poisoned with NaN before each launch so that an
element the kernels fail to write is caught; checked against the float64 formula."""

import pytest
import torch

from fastpurify.kernels.layer_norm import ln_backward, ln_forward

from ..formulas import layer_norm

CASES = [  # (N, C, S, groups): x seen as (N, C, S); S = 1 is a 2-D (N, C) batch
    (3, 7, 1, 1), (4, 13, 5, 2), (6, 17, 15, 3), (2, 1000, 3, 2), (4, 1, 6, 2),
]


@pytest.mark.parametrize("n, c, s, groups", CASES)
def test_kernels_write_every_output_and_match(n, c, s, groups):
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(n, s, c, generator=g).transpose(1, 2) * 2 + 0.5  # features contiguous, as (N, T, C) tokens
    weight, bias, mask = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) - 0.5, torch.rand(c, generator=g)
    noise, noise_bias = torch.rand(groups, c, generator=g) - 0.5, torch.rand(groups, c, generator=g) - 0.5
    y3 = torch.full_like(x3, float("nan"))
    mean, rstd = torch.full((n * s,), float("nan")), torch.full((n * s,), float("nan"))
    ln_forward(x3, y3, weight, bias, mask, noise, noise_bias, mean, rstd, groups=groups, eps=1e-5)
    ref = layer_norm(x3, weight, bias, mask, noise, noise_bias, groups=groups, channel_dim=1)
    assert not torch.isnan(y3).any() and not torch.isnan(mean).any() and not torch.isnan(rstd).any()
    torch.testing.assert_close(y3.double(), ref, rtol=1e-5, atol=2e-5)
    dy3 = torch.randn(n, c, s, generator=g)
    dx3 = torch.full_like(x3, float("nan"))
    sum_a, sum_b = ln_backward(x3, dy3, dx3, weight, mask, noise, mean, rstd, groups=groups)
    xd = x3.double().requires_grad_(True)
    want_dx, = torch.autograd.grad(layer_norm(xd, weight, bias, mask, noise, noise_bias, groups=groups,
                                              channel_dim=1), xd, dy3.double())
    assert not torch.isnan(dx3).any()
    torch.testing.assert_close(dx3.double(), want_dx, rtol=1e-4, atol=1e-4)
    mu, var = x3.double().mean(1, keepdim=True), x3.double().var(1, unbiased=False, keepdim=True)
    xhat = (x3.double() - mu) / torch.sqrt(var + 1e-5)
    for got, full in ((sum_a, dy3.double() * xhat), (sum_b, dy3.double())):
        want = torch.stack([part.sum((0, 2)) for part in full.chunk(groups)])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
