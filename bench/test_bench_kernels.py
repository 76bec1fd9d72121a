"""Microbenchmarks of each fused operation against the plain PyTorch composition and
torch.compile of that composition, in one process on one device.

On a GPU: the BatchNorm layers of ResNet-18 on CIFAR (batch 128 and 256, as ANP's two-group
batch), the mask/noise arena of ResNet-18 (4,800 neurons), a PGD step on a CIFAR batch and PBE's
scoring of 50,000 logit rows. On CPU: tiny shapes, as a smoke test (the default `make test` runs
each benchmark once). Each records the bytes it must move and the achieved GB/s in extra_info.
"""

import pytest
import torch
import torch.nn.functional as F

from fastpurify import functional as FP
from fastpurify.benchmarks.batch_norm import grouped_composition

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BN_SHAPES = ([(b, c, s, s) for b in (128, 256) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))]
             if CUDA else [(8, 16, 6, 6)])
IMPLS = ["fastpurify", "torch", "torch.compile"]


def sync():
    if CUDA:
        torch.cuda.synchronize()


# The plain PyTorch way (one F.batch_norm per group with the masked, perturbed affine), as
# `fastpurify bench bn` times it, for ANP's two groups.
composition = grouped_composition(2)


_compiled = {}


def implementation(name):
    if name == "fastpurify":
        return lambda *a: FP.perturbed_batch_norm(*a, groups=2)
    if name == "torch":
        return composition
    if not CUDA and not _compiled:
        pytest.importorskip("torch._inductor")
    return _compiled.setdefault("bn", torch.compile(composition, dynamic=False))


def bn_inputs(shape, channels_last):
    b, c = shape[:2]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(2 * b, *shape[1:], device=DEVICE, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    frozen = dict(weight=torch.rand(c, device=DEVICE, generator=g), bias=torch.randn(c, device=DEVICE, generator=g))
    learned = dict(mask=torch.rand(c, device=DEVICE, generator=g),
                   noise=torch.rand(2, c, device=DEVICE, generator=g) * 0.1,
                   noise_bias=torch.rand(2, c, device=DEVICE, generator=g) * 0.1)
    for t in learned.values():
        t.requires_grad_()
    return x.requires_grad_(), frozen, learned


def record(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [*IMPLS, "copy"])
def test_bn_forward(benchmark, impl, shape, channels_last):
    """``copy`` (y = x.clone(), the same bytes moved) gives the bandwidth the kernel is held to."""
    benchmark.group = f"bn-forward {'x'.join(map(str, shape))} {'nhwc' if channels_last else 'nchw'}"
    x, frozen, learned = bn_inputs(shape, channels_last)
    fn = (lambda x, *_: x.clone()) if impl == "copy" else implementation(impl)

    def run():
        with torch.no_grad():
            y = fn(x, frozen["weight"], frozen["bias"], learned["mask"], learned["noise"], learned["noise_bias"])
        sync()
        return y

    y = benchmark(run)
    assert y.shape == x.shape
    record(benchmark, 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_bn_forward_backward(benchmark, impl, shape, channels_last):
    """ANP's case: weights frozen, gradients to the input, the mask and both noises."""
    benchmark.group = f"bn-fwd+bwd {'x'.join(map(str, shape))} {'nhwc' if channels_last else 'nchw'}"
    x, frozen, learned = bn_inputs(shape, channels_last)
    dy = torch.randn_like(x)
    fn = implementation(impl)
    inputs = [x, *learned.values()]

    def run():
        y = fn(x, frozen["weight"], frozen["bias"], learned["mask"], learned["noise"], learned["noise_bias"])
        grads = torch.autograd.grad(y, inputs, dy)
        sync()
        return grads

    grads = benchmark(run)
    assert grads[0].shape == x.shape
    record(benchmark, 5 * x.numel() * x.element_size())  # forward: x, y; backward: x, dy, dx


ARENA_LAYERS = [64] * 5 + [128] * 5 + [256] * 5 + [512] * 5  # ResNet-18's 20 BN layers, 4,800 neurons


@pytest.mark.parametrize("impl", ["fastpurify", "torch-per-layer"])
def test_mask_and_noise_updates(benchmark, impl):
    """One ANP iteration's updates of every mask, noise and momentum buffer of ResNet-18."""
    benchmark.group = "arena-updates resnet18"
    n = sum(ARENA_LAYERS)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    mask, mgrad, buf = (torch.rand(n, device=DEVICE, generator=g) for _ in range(3))
    noise, ngrad = torch.rand(2 * n, device=DEVICE, generator=g), torch.randn(2 * n, device=DEVICE, generator=g)
    offsets = torch.tensor([0] + ARENA_LAYERS).cumsum(0).tolist()

    def fused():
        FP.noise_sign_step_(noise, ngrad, 0.4, 0.4)
        FP.mask_sgd_step_(mask, mgrad, buf, 0.2, 0.9)
        sync()

    def per_layer():
        with torch.no_grad():
            for a, b in zip(offsets[:-1], offsets[1:]):
                for half in (0, n):
                    v = noise[half + a:half + b]
                    v.add_(torch.sign(ngrad[half + a:half + b]), alpha=0.4).clamp_(-0.4, 0.4)
                bb = buf[a:b].mul_(0.9).add_(mgrad[a:b])
                mask[a:b].sub_(bb, alpha=0.2).clamp_(0, 1)
        sync()

    benchmark(fused if impl == "fastpurify" else per_layer)
    record(benchmark, 4 * (2 * n + 3 * n) + 4 * 2 * n)


@pytest.mark.parametrize("impl", ["fastpurify", "torch"])
def test_pgd_step(benchmark, impl):
    benchmark.group = "pgd-step"
    shape = (128, 3, 32, 32) if CUDA else (8, 3, 8, 8)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x0 = torch.rand(shape, device=DEVICE, generator=g)
    x, grad = x0.clone(), torch.randn(shape, device=DEVICE, generator=g)

    def torch_step():
        with torch.no_grad():
            x.add_(torch.sign(grad), alpha=2 / 255)
            delta = torch.clamp(x - x0, -8 / 255, 8 / 255)
            x.copy_(torch.clamp(x0 + delta, 0, 1))
        sync()

    def fused():
        FP.pgd_step_(x, x0, grad, 2 / 255, 8 / 255)
        sync()

    benchmark(fused if impl == "fastpurify" else torch_step)
    record(benchmark, 4 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", ["fastpurify", "torch"])
def test_logits_cosine(benchmark, impl):
    benchmark.group = "logits-cosine"
    n = 50_000 if CUDA else 500
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a, b = torch.randn(n, 10, device=DEVICE, generator=g), torch.randn(n, 10, device=DEVICE, generator=g)

    def run():
        out = FP.logits_cosine(a, b) if impl == "fastpurify" else F.cosine_similarity(a, b)
        sync()
        return out

    assert benchmark(run).shape == (n,)
    record(benchmark, 2 * a.numel() * a.element_size())



# (shape, channel_dim, channels_last): ViT-B/16 tokens at 224, ViT-S tokens on CIFAR (patch 4) and
# ConvNeXt-T's first-stage LayerNorm2d in both layouts; ANP's batch of two groups of 128 (2 x 4 on CPU).
LN_CASES = ([((256, 197, 768), -1, False), ((256, 65, 384), -1, False), ((256, 96, 56, 56), 1, False),
             ((256, 96, 56, 56), 1, True)] if CUDA
            else [((8, 5, 24), -1, False), ((8, 12, 4, 4), 1, False), ((8, 12, 4, 4), 1, True)])


def ln_composition(x, weight, bias, mask, noise, noise_bias, channel_dim=-1):
    """The plain PyTorch way: one F.layer_norm per group with the masked, perturbed affine; over
    the channels of NCHW as torchvision's LayerNorm2d does it (features moved last and back)."""
    outs = []
    for g, xg in enumerate(x.chunk(2)):
        xg = xg.permute(0, 2, 3, 1) if channel_dim == 1 else xg
        yg = F.layer_norm(xg, (xg.shape[-1],), weight * (mask + noise[g]), bias * (1 + noise_bias[g]))
        outs.append(yg.permute(0, 3, 1, 2) if channel_dim == 1 else yg)
    return torch.cat(outs)


def ln_implementation(name, channel_dim):
    if name == "fastpurify":
        return lambda *a: FP.perturbed_layer_norm(*a, groups=2, channel_dim=channel_dim)
    composed = lambda *a: ln_composition(*a, channel_dim=channel_dim)  # noqa: E731
    if name == "torch":
        return composed
    if not CUDA:  # a CPU compile takes seconds a shape; the BatchNorm benchmarks smoke-test it already
        pytest.skip("torch.compile of the LayerNorm composition is benchmarked on a GPU only")
    return _compiled.setdefault(f"ln{channel_dim}", torch.compile(composed, dynamic=False))


def ln_inputs(shape, channel_dim, channels_last):
    c = shape[channel_dim]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    frozen = dict(weight=torch.rand(c, device=DEVICE, generator=g), bias=torch.randn(c, device=DEVICE, generator=g))
    learned = dict(mask=torch.rand(c, device=DEVICE, generator=g),
                   noise=torch.rand(2, c, device=DEVICE, generator=g) * 0.1,
                   noise_bias=torch.rand(2, c, device=DEVICE, generator=g) * 0.1)
    for t in learned.values():
        t.requires_grad_()
    return x.requires_grad_(), frozen, learned


def ln_id(case):
    shape, channel_dim, channels_last = case
    layout = "nhwc" if channels_last else ("nchw" if channel_dim == 1 else "tokens")
    return f"{'x'.join(map(str, shape))} {layout}"


@pytest.mark.parametrize("case", LN_CASES, ids=ln_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_ln_forward_backward(benchmark, impl, case):
    """ANP's case on a transformer or ConvNeXt: weights frozen, gradients to the input, the mask
    and both noises."""
    shape, channel_dim, channels_last = case
    fn = ln_implementation(impl, channel_dim)
    benchmark.group = f"ln-fwd+bwd {ln_id(case)}"
    x, frozen, learned = ln_inputs(shape, channel_dim, channels_last)
    dy = torch.randn_like(x)
    inputs = [x, *learned.values()]

    def run():
        y = fn(x, frozen["weight"], frozen["bias"], learned["mask"], learned["noise"], learned["noise_bias"])
        grads = torch.autograd.grad(y, inputs, dy)
        sync()
        return grads

    grads = benchmark(run)
    assert grads[0].shape == x.shape
    record(benchmark, 5 * x.numel() * x.element_size())  # forward: x, y; backward: x, dy, dx
