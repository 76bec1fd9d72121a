"""Float64 references written from the formulas of DESIGN.md §1, independent of fastpurify.
The references compute on their inputs' device; the random parameters are drawn on the CPU and
put on the tests' device (tests/devices.py)."""

import torch

from .devices import on_device


def batch_norm(x, weight, bias, mask, noise=None, noise_bias=None, running_mean=None, running_var=None,
               training=True, momentum=0.1, eps=1e-5, groups=1):
    """Masked-and-perturbed BatchNorm in float64, differentiable by autograd.

    Returns y (float64) and the new running statistics (or None)."""
    n, c = x.shape[:2]
    xs = x.double().reshape(n, c, -1)
    ng = n // groups
    rm = running_mean.double().clone() if running_mean is not None else None
    rv = running_var.double().clone() if running_var is not None else None
    outs = []
    for g in range(groups):
        xg = xs[g * ng:(g + 1) * ng]
        if training:
            mu = xg.mean(dim=(0, 2))
            var = ((xg - mu[None, :, None]) ** 2).mean(dim=(0, 2))
            if rm is not None:
                m = xg.shape[0] * xg.shape[2]
                rm = (1 - momentum) * rm + momentum * mu.detach()
                rv = (1 - momentum) * rv + momentum * var.detach() * m / (m - 1)
        else:
            mu, var = running_mean.double(), running_var.double()
        r = 1.0 / torch.sqrt(var + eps)
        scale = weight.double() * (mask.double() + (noise[g].double() if noise is not None else 0.0))
        shift = bias.double() * (1.0 + (noise_bias[g].double() if noise_bias is not None else 0.0))
        outs.append((xg - mu[None, :, None]) * (r * scale)[None, :, None] + shift[None, :, None])
    return torch.cat(outs).reshape(x.shape), rm, rv


def _grads(forward, x, weight, bias, mask, noise, noise_bias, dy, **kwargs):
    """Gradients of sum(y * dy) by autograd through ``forward(x, weight, bias, mask, noise,
    noise_bias, **kwargs) -> y`` in float64: a dict with keys x, mask and those of weight, bias,
    noise, noise_bias that are not None (zeros for one that y does not depend on)."""
    leaves = {k: t.detach().double().requires_grad_() for k, t in
              dict(x=x, weight=weight, bias=bias, mask=mask, noise=noise, noise_bias=noise_bias).items()
              if t is not None}
    y = forward(leaves["x"], leaves.get("weight"), leaves.get("bias"), leaves["mask"], leaves.get("noise"),
                leaves.get("noise_bias"), **kwargs)
    grads = torch.autograd.grad((y * dy.double()).sum(), list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(leaves.items(), grads)}


def batch_norm_grads(x, weight, bias, mask, noise, noise_bias, dy, **kwargs):
    """Gradients of sum(y * dy) by autograd through :func:`batch_norm` in float64:
    a dict with keys x, weight, bias, mask, noise, noise_bias."""
    return _grads(lambda *args, **kw: batch_norm(*args, **kw)[0], x, weight, bias, mask, noise, noise_bias, dy,
                  **kwargs)


def random_bn_params(c, groups, seed=0):
    """Seeded weight, bias, mask (C,) and noise, noise_bias (groups, C) of typical ANP ranges, on the
    tests' device."""
    g = torch.Generator().manual_seed(seed)
    p = dict(weight=torch.rand(c, generator=g) + 0.5, bias=torch.randn(c, generator=g),
             mask=torch.rand(c, generator=g), noise=(torch.rand(groups, c, generator=g) - 0.5) * 0.8,
             noise_bias=(torch.rand(groups, c, generator=g) - 0.5) * 0.8)
    return {k: on_device(v) for k, v in p.items()}


def random_running_stats(c, seed=5):
    """Seeded running_mean and running_var (C,), on the tests' device."""
    g = torch.Generator().manual_seed(seed)
    return dict(running_mean=on_device(torch.randn(c, generator=g) * 0.1),
                running_var=on_device(torch.rand(c, generator=g) + 0.5))


def _perturbed_affine(xhat, weight, bias, mask, noise, noise_bias, groups):
    """``xhat`` (features last) scaled by weight * (mask + noise[g]) and shifted by
    bias * (1 + noise_bias[g]) in float64, batch chunk g (of ``groups`` equal contiguous chunks)
    by row g of the noises; weight/bias None mean ones/zeros."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    outs = []
    for g, part in enumerate(xhat.chunk(groups)):
        scale = d(mask) + (0 if noise is None else d(noise)[g])
        if weight is not None:
            scale = scale * d(weight)
        shift = 0 if bias is None else d(bias) * (1 + (0 if noise_bias is None else d(noise_bias)[g]))
        outs.append(part * scale + shift)
    return torch.cat(outs)


def layer_norm(x, weight, bias, mask, noise=None, noise_bias=None, eps=1e-5, groups=1, channel_dim=-1):
    """The masked-and-perturbed LayerNorm in float64: per position over the feature axis, group g
    scaled by weight * (mask + noise[g]) and shifted by bias * (1 + noise_bias[g])."""
    moved = x.double().movedim(channel_dim, -1)
    mu, var = moved.mean(-1, keepdim=True), moved.var(-1, unbiased=False, keepdim=True)
    xhat = (moved - mu) / torch.sqrt(var + eps)
    return _perturbed_affine(xhat, weight, bias, mask, noise, noise_bias, groups).movedim(-1, channel_dim)


def layer_norm_grads(x, weight, bias, mask, noise, noise_bias, dy, **kwargs):
    """Gradients of sum(y * dy) by autograd through :func:`layer_norm` in float64: a dict with
    keys x, mask and those of weight, bias, noise, noise_bias that are not None (noise_bias
    without a bias gets zeros)."""
    return _grads(layer_norm, x, weight, bias, mask, noise, noise_bias, dy, **kwargs)


def group_norm(x, weight, bias, mask, noise=None, noise_bias=None, num_groups=1, eps=1e-5, groups=1):
    """The masked-and-perturbed GroupNorm in float64: each sample over each of ``num_groups``
    groups of C / num_groups consecutive channels and all positions (biased variance); then per
    channel, batch chunk g (of ``groups`` equal contiguous chunks) scaled by
    weight * (mask + noise[g]) and shifted by bias * (1 + noise_bias[g])."""
    n, c = x.shape[:2]
    rows = x.double().reshape(n, num_groups, -1)
    mu, var = rows.mean(-1, keepdim=True), rows.var(-1, unbiased=False, keepdim=True)
    xhat = ((rows - mu) / torch.sqrt(var + eps)).reshape(n, c, -1).transpose(1, 2)  # channels last
    return _perturbed_affine(xhat, weight, bias, mask, noise, noise_bias, groups).transpose(1, 2).reshape(x.shape)


def group_norm_grads(x, weight, bias, mask, noise, noise_bias, dy, **kwargs):
    """Gradients of sum(y * dy) by autograd through :func:`group_norm` in float64: a dict with
    keys x, mask and those of weight, bias, noise, noise_bias that are not None (noise_bias
    without a bias gets zeros)."""
    return _grads(group_norm, x, weight, bias, mask, noise, noise_bias, dy, **kwargs)
