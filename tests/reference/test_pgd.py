import pytest
import torch
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify.inference import eval_mode
from fastpurify.models import small_cnn
from fastpurify.reference import pgd
from fastpurify.training import train_classifier


def _setup(dtype=torch.float32):
    """A small BN CNN fitted to 12 random images (so that its loss has somewhere to rise)."""
    torch.manual_seed(0)
    model = small_cnn(num_classes=5, in_channels=3, width=4).to(dtype)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(12, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (12,), generator=g)
    train_classifier(model, x, y, epochs=30, lr=0.05, batch_size=12, augment=False, progress=False)
    model.zero_grad(set_to_none=True)
    return model, x, y


def _loss(model, x, y):
    with torch.no_grad(), eval_mode(model):
        return float(F.cross_entropy(model(x), y))


def _per_image_l2(t):
    return t.flatten(1).norm(dim=1)


def _hand_pgd(model, x0, y, eps, alpha, steps, norm, lo, hi):
    """torchattacks' PGD / PGDL2 loop without random start, written out."""
    adv = x0.clone()
    model.eval()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        if norm == "linf":
            adv = adv.detach() + alpha * g.sign()
            delta = torch.clamp(adv - x0, min=-eps, max=eps)
        else:
            adv = adv.detach() + alpha * g / (_per_image_l2(g) + 1e-10).view(-1, 1, 1, 1)
            delta = adv - x0
            delta = delta * torch.min(eps / _per_image_l2(delta), torch.ones(len(x0), dtype=x0.dtype)).view(-1, 1, 1, 1)
        adv = torch.clamp(x0 + delta, min=lo, max=hi).detach()
    return adv


@pytest.mark.parametrize("norm, eps, alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_matches_the_torchattacks_loop_in_float64(norm, eps, alpha):
    model, x, y = _setup(torch.float64)
    adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=5, random_start=False, norm=norm)
    torch.testing.assert_close(adv, _hand_pgd(model, x, y, eps, alpha, 5, norm, 0.0, 1.0))


@pytest.mark.parametrize("norm, eps, alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
@pytest.mark.parametrize("random_start", [False, True])
def test_constraints_hold_and_the_loss_rises(norm, eps, alpha, random_start):
    model, x, y = _setup()
    x = 0.2 + 0.6 * x  # pixels in [0.2, 0.8]; the box [lo, hi] = [0.25, 0.75] is tighter than the data's
    x = x.clamp(0.25, 0.75)
    adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=10, random_start=random_start, norm=norm, lo=0.25, hi=0.75,
              seed=0)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float(adv.min()) >= 0.25 and float(adv.max()) <= 0.75
    if norm == "linf":
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float((adv - x).abs().max()) > 0.9 * eps
    else:
        assert float(_per_image_l2(adv - x).max()) <= eps + 1e-5
    assert _loss(model, adv, y) > _loss(model, x, y) + 0.05


def test_model_state_is_restored_and_gets_no_gradients():
    model, x, y = _setup()
    model.train()
    model.features[1].eval()
    model.features[0].weight.requires_grad_(False)
    x_before = x.clone()
    pgd(model, x, y, steps=2)
    assert model.training and not model.features[1].training and model.features[4].training
    assert not model.features[0].weight.requires_grad and model.classifier.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before)
    # eval mode during the attack: a training-mode model gives the eval-mode result
    model.eval()
    expected = pgd(model, x, y, steps=2, random_start=False)
    model.train()
    assert torch.equal(pgd(model, x, y, steps=2, random_start=False), expected)


def test_random_start_is_seeded():
    model, x, y = _setup()
    a, b = pgd(model, x, y, seed=1, steps=1), pgd(model, x, y, seed=1, steps=1)
    c = pgd(model, x, y, seed=2, steps=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(pgd(model, x, y, generator=torch.Generator().manual_seed(1), steps=1), a)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=0), "eps .* must be a positive"),
    (dict(alpha=-1), "alpha .* must be a positive"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(norm="l1"), "norm must be one of"),
    (dict(lo=1.0, hi=0.0), "lo < hi"),
    (dict(lo=0.5), r"images must lie in the pixel range \[0.5, 1.0\]"),
    (dict(seed=0, generator=torch.Generator()), "not both"),
])
def test_bad_settings(kwargs, message):
    model, x, y = _setup()
    with pytest.raises(InputError, match=message):
        pgd(model, x, y, **kwargs)


@pytest.mark.parametrize("norm, eps, alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_chunks_do_not_change_the_result(norm, eps, alpha):
    """One random-start draw for all images, then eval-mode attacks chunk by chunk."""
    model, x, y = _setup(torch.float64)
    whole = pgd(model, x, y, eps=eps, alpha=alpha, steps=4, norm=norm, seed=3)
    for batch_size in (1, 5):
        chunked = pgd(model, x, y, eps=eps, alpha=alpha, steps=4, norm=norm, seed=3, batch_size=batch_size)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        pgd(model, x, y, batch_size=0)
