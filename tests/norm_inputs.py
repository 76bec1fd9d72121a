"""Seeded inputs and parameters, and the checks, that the tests of the masked-and-perturbed norms
(BatchNorm, LayerNorm, GroupNorm) share; each on the tests' device (tests/devices.py)."""

import torch

from .devices import TEST_DEVICE, on_device
from .formulas import random_bn_params


def inputs(shape, channels_last=False, dtype=torch.float32, seed=1):
    """A seeded x of ``shape`` (mean 0.3, std 1.5) that requires grad, channels_last if asked."""
    x = on_device((torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3).to(dtype))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def params(c, groups, noisy=True, affine=True, weight_grad=False, seed=0, dtype=torch.float32):
    """weight, bias, mask, noise, noise_bias: the mask and noises require grad, weight and bias if
    asked. ``noisy`` False: no noises; ``affine`` "weight": no bias (nor noise_bias), False: no
    weight either."""
    p = {k: v.to(dtype) for k, v in random_bn_params(c, groups, seed).items()}
    if not noisy:
        p["noise"] = p["noise_bias"] = None
    if affine is not True:
        p["bias"] = p["noise_bias"] = None
    if not affine:
        p["weight"] = None
    for k, v in p.items():
        if v is not None:
            v.requires_grad_(k in ("mask", "noise", "noise_bias") or weight_grad)
    return p


def detached(p):
    return {k: None if v is None else v.detach() for k, v in p.items()}


def assert_every_gradient(tensors, ref, atol=5e-5):
    """Each tensor's gradient (of those not None) against the float64 reference ``ref[name]``, to
    ``atol`` times the reference's largest magnitude plus one; a tensor that does not require
    grad must have got none (frozen weights cost no work)."""
    for k, t in tensors.items():
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None, k
            continue
        assert t.grad.shape == t.shape, k
        scale = ref[k].abs().max().item() + 1.0
        assert torch.allclose(t.grad.double(), ref[k], atol=atol * scale, rtol=1e-4), k


def arena_views(p, c, groups):
    """``p``'s mask, noise and noise_bias as a layer's views into flat arenas, each requiring
    grad: the (groups, C) noises rows of a (groups, 2, C + 7) arena (rows strided by 2 (C + 7)),
    the mask a slice of a flat vector."""
    arena = torch.zeros(groups, 2, c + 7, device=TEST_DEVICE)
    arena[:, 0, 3:3 + c], arena[:, 1, 3:3 + c] = p["noise"], p["noise_bias"]
    mask_arena = torch.zeros(c + 4, device=TEST_DEVICE)
    mask_arena[2:2 + c] = p["mask"]
    noise, noise_bias, mask = arena[:, 0, 3:3 + c], arena[:, 1, 3:3 + c], mask_arena[2:2 + c]
    for t in (noise, noise_bias, mask):
        t.requires_grad_()
    assert noise.stride() == (2 * (c + 7), 1)
    return mask, noise, noise_bias


def assert_bitwise_deterministic(norm, x, p):
    """``norm(x, **p)`` twice, forward and backward: y and the gradients of x, mask, noise and
    noise_bias bitwise equal."""
    runs = []
    for _ in range(2):
        for t in (x, *p.values()):
            t.grad = None
        y = norm(x, **p)
        y.backward(torch.linspace(-1, 1, y.numel(), device=TEST_DEVICE).view_as(y))
        runs.append([y.detach().clone(), x.grad.clone(), p["mask"].grad.clone(), p["noise"].grad.clone(),
                     p["noise_bias"].grad.clone()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
