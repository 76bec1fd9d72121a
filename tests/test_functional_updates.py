"""The in-place update operations, PGD step and logit cosine, on both backends, against their
formulas."""

import pytest
import torch

from fastpurify import functional as FP
from fastpurify.validation import InputError

from .devices import TEST_DEVICE, device_generator, float64_tol, on_device, to_device


def tensor(values):
    """A float32 tensor of ``values`` on the tests' device."""
    return torch.tensor(values, device=TEST_DEVICE)


def zeros(*shape, **kwargs):
    """torch.zeros on the tests' device unless another device is given."""
    return torch.zeros(*shape, **{"device": TEST_DEVICE, **kwargs})


def test_noise_sign_step(backend):
    noise = tensor([0.0, 0.3, -0.35, 0.39, -0.1, 0.2])
    grad = tensor([1.0, 2.0, -0.5, 0.0, -3.0, -1e-30])
    clamped = FP.noise_sign_step_(noise.clone(), grad, 0.1, 0.4, clamp=True)
    assert torch.allclose(clamped, tensor([0.1, 0.4, -0.4, 0.39, -0.2, 0.1]))
    free = FP.noise_sign_step_(noise.clone(), grad, 0.1, 0.4, clamp=False)
    assert torch.allclose(free, tensor([0.1, 0.4, -0.45, 0.39, -0.2, 0.1]))


def test_noise_sign_step_is_in_place_on_views(backend):
    arena = zeros(10)
    view = arena[2:7]
    out = FP.noise_sign_step_(view, torch.ones(5, device=TEST_DEVICE), 0.5, 0.4)
    assert out.data_ptr() == view.data_ptr()
    assert torch.equal(arena, tensor([0, 0] + [0.4] * 5 + [0, 0, 0]))


def test_mask_sgd_step_matches_torch_sgd(backend):
    g = torch.Generator().manual_seed(0)
    mask = on_device(torch.rand(1000, generator=g))
    ref = torch.nn.Parameter(mask.clone())
    opt = torch.optim.SGD([ref], lr=0.2, momentum=0.9)
    buf = zeros(1000)
    for _ in range(4):
        grad = on_device(torch.randn(1000, generator=g))
        FP.mask_sgd_step_(mask, grad, buf, lr=0.2, momentum=0.9)
        ref.grad = grad.clone()
        opt.step()
        with torch.no_grad():
            ref.clamp_(0, 1)
        assert torch.allclose(mask, ref.detach(), atol=1e-6)
        assert torch.allclose(buf, opt.state[ref]["momentum_buffer"], atol=1e-6)
    assert float(mask.min()) == 0.0 and float(mask.max()) == 1.0  # the clamp bites


def test_updates_on_empty_and_single(backend):
    for n in (0, 1):
        noise, grad = zeros(n), -torch.ones(n, device=TEST_DEVICE)
        assert torch.equal(FP.noise_sign_step_(noise, grad, 0.2, 0.4), torch.full((n,), -0.2, device=TEST_DEVICE))
        mask, buf = torch.ones(n, device=TEST_DEVICE), zeros(n)
        assert torch.allclose(FP.mask_sgd_step_(mask, grad, buf, 0.2, 0.9), torch.ones(n, device=TEST_DEVICE))
        assert buf.tolist() == [-1.0] * n


def test_update_errors(backend):
    with pytest.raises(InputError, match="one shape"):
        FP.noise_sign_step_(zeros(3), zeros(4), 0.1, 0.4)
    with pytest.raises(InputError, match="contiguous"):
        FP.noise_sign_step_(zeros(4, 2)[:, 0], zeros(4), 0.1, 0.4)
    with pytest.raises(InputError, match="floating"):
        FP.mask_sgd_step_(zeros(3, dtype=torch.int32), zeros(3), zeros(3), 0.1, 0.9)
    with pytest.raises(InputError, match="one device"):
        FP.mask_sgd_step_(zeros(3), zeros(3, device="meta"), zeros(3), 0.1, 0.9)


def pgd_formula(x, x0, grad, alpha, eps, lo, hi):
    step = x.double() + alpha * torch.sign(grad.double())
    low = torch.clamp(x0.double() - eps, min=lo)
    high = torch.clamp(x0.double() + eps, max=hi)
    return torch.minimum(torch.maximum(step, low), high)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1,), (3, 3, 7, 9)])
def test_pgd_step(backend, shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=g)
    x = (x0 + (torch.rand(shape, generator=g) - 0.5) * 0.05).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    x0, x, grad = to_device(x0, x, grad)
    grad.view(-1)[:1] = 0.0
    expected = pgd_formula(x, x0, grad, 2 / 255, 8 / 255, 0.0, 1.0)
    out = FP.pgd_step_(x, x0, grad, 2 / 255, 8 / 255)
    assert out.data_ptr() == x.data_ptr() and torch.allclose(x.double(), expected, atol=1e-7)
    assert ((x - x0).abs() <= 8 / 255 + 1e-6).all() and (x >= 0).all() and (x <= 1).all()


def test_pgd_step_clamps_once_to_the_intersection(backend):
    # x0 near the top of the range: the upper bound is hi, not x0 + eps.
    x0 = tensor([0.99, 0.5, 0.01])
    x = x0.clone()
    FP.pgd_step_(x, x0, tensor([1.0, 1.0, -1.0]), alpha=0.1, eps=0.05, lo=0.0, hi=1.0)
    assert torch.allclose(x, tensor([1.0, 0.55, 0.0]))


def test_random_start_is_seeded_and_bounded(backend):
    x0 = on_device(torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(1)))
    # drawn on x0's device, so with a generator of that device
    a = FP.pgd_random_start(x0, 0.1, generator=device_generator(7))
    b = FP.pgd_random_start(x0, 0.1, generator=device_generator(7))
    assert torch.equal(a, b) and not torch.equal(a, x0)
    u = torch.rand(x0.shape, generator=device_generator(7), device=TEST_DEVICE)
    assert torch.allclose(a, (x0 + 0.1 * (2 * u - 1)).clamp(0, 1), atol=1e-7)
    assert ((a - x0).abs() <= 0.1 + 1e-6).all() and a.min() >= 0 and a.max() <= 1


def test_pgd_errors(backend):
    with pytest.raises(InputError, match="lo < hi"):
        FP.pgd_step_(zeros(3), zeros(3), zeros(3), 0.1, 0.1, lo=1.0, hi=0.0)
    with pytest.raises(InputError, match="eps must be >= 0"):
        FP.pgd_random_start(zeros(3), -0.1)
    with pytest.raises(InputError, match="one shape"):
        FP.pgd_step_(zeros(3), zeros(2), zeros(3), 0.1, 0.1)


@pytest.mark.parametrize("n, k", [(0, 10), (1, 1), (5, 10), (300, 43)])
def test_logits_cosine(backend, n, k):
    g = torch.Generator().manual_seed(0)
    a, b = on_device(torch.randn(n, k, generator=g)), on_device(torch.randn(n, k, generator=g))
    got = FP.logits_cosine(a, b)
    expected = (a.double() * b.double()).sum(1) / (a.double().norm(dim=1) * b.double().norm(dim=1)).clamp_min(1e-8)
    assert got.shape == (n,) and torch.allclose(got.double(), expected, atol=1e-6)
    if n:
        assert torch.allclose(got, torch.nn.functional.cosine_similarity(a, b), atol=1e-6)


def test_logits_cosine_zero_rows_and_errors(backend):
    a = tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0]])
    b = tensor([[1.0, 1.0], [2.0, 4.0], [-1.0, 0.0]])
    assert torch.allclose(FP.logits_cosine(a, b), tensor([0.0, 1.0, -1.0]))
    with pytest.raises(InputError, match="one shape"):
        FP.logits_cosine(a, b[:2])


def pgd_l2_formula(x, x0, grad, alpha, eps, lo, hi):
    """torchattacks' PGDL2 step in float64."""
    x, x0, grad = x.double(), x0.double(), grad.double()
    g_norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
    moved = x + alpha * grad / (g_norm + 1e-10)
    delta = moved - x0
    d_norm = delta.flatten(1).norm(dim=1).view_as(g_norm)
    return (x0 + delta * torch.clamp(eps / d_norm, max=1.0)).clamp(lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 3, 7, 9), (2, 1, 40, 41), (5, 2500)])
@pytest.mark.parametrize("eps", [0.05, 3.0])  # the projection binds / does not bind
def test_pgd_l2_step(backend, shape, dtype, eps):
    g = torch.Generator().manual_seed(len(shape))
    x0 = torch.rand(shape, generator=g, dtype=dtype)
    x = (x0 + 0.02 * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    x0, x, grad = to_device(x0, x, grad)
    expected = pgd_l2_formula(x, x0, grad, 0.1, eps, 0.0, 1.0)
    out = FP.pgd_l2_step_(x, x0, grad, 0.1, eps)
    assert out.data_ptr() == x.data_ptr()
    # Compiled, Triton passes the Python floats alpha and eps as float32 scalars (the interpreter
    # keeps them float64): a float64 step then carries their float32 rounding, ~1e-9 here.
    tol = 2e-6 if dtype == torch.float32 else float64_tol(backend)
    torch.testing.assert_close(x.double(), expected, rtol=tol, atol=tol)
    d_norm = (x.double() - x0.double()).flatten(1).norm(dim=1)
    assert float(d_norm.max()) <= eps + 1e-5


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's eps / 0 = inf, as on a GPU
def test_pgd_l2_step_zero_gradient_and_errors(backend):
    x0 = torch.full((2, 3), 0.5, device=TEST_DEVICE)
    x = x0.clone()
    FP.pgd_l2_step_(x, x0, zeros(2, 3), 0.1, 0.3)
    assert torch.equal(x, x0), "a zero gradient moves nothing (no NaN from 0/0)"
    with pytest.raises(InputError, match="needs a batch"):
        FP.pgd_l2_step_(zeros(3), zeros(3), zeros(3), 0.1, 0.1)


def test_l2_random_start_draws_like_torchattacks(backend):
    x0 = on_device(torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    g = device_generator(3)  # the draws are on x0's device
    out = FP.pgd_random_start(x0, 0.5, generator=device_generator(3), norm="l2")
    delta = torch.empty_like(x0).normal_(generator=g)
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = torch.empty_like(norms).uniform_(0, 1, generator=g)
    torch.testing.assert_close(out, (x0 + delta * radius / norms * 0.5).clamp(0, 1), rtol=1e-12, atol=1e-12)
    assert float((out - x0).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-9
    with pytest.raises(InputError, match="norm must be"):
        FP.pgd_random_start(x0, 0.5, norm="l1")
