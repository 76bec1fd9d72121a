"""GroupNorm microbenchmarks on a GPU: fastpurify's fused masked-and-perturbed GroupNorm
(``perturbed_group_norm``, the Triton kernels) against the plain PyTorch composition (one
``F.group_norm`` per batch group with the masked, perturbed affine, then ``torch.cat``) and
against ``F.group_norm`` alone over the whole batch (PyTorch's own kernel with one affine: the
floor the fused kernels should not be slower than), forward+backward as ANP runs it: weights
frozen, gradients to x, the mask and both noises (``F.group_norm`` alone: to x and its own
effective weight and bias). Shapes: PoolFormer-S12's GroupNorm(1, C) at 224 px and ResNet-50-GN's
GroupNorm(32, C), ANP's batch of two groups, NCHW and channels_last. Each records the bytes it
must move (x and y forward; x, dy and dx backward) and the achieved GB/s in extra_info.

GPU only: the interpreter's timings mean nothing, so on CPU every case is skipped."""

import pytest
import torch
import torch.nn.functional as F

from fastpurify import functional as FP

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="GroupNorm kernel timings need a CUDA device")

# (N, C, side, num_groups): N = two batch groups
SHAPES = [(256, 64, 56, 1), (256, 128, 28, 1), (256, 320, 14, 1), (256, 512, 7, 1),  # PoolFormer-S12
          (128, 256, 56, 32), (128, 512, 28, 32), (128, 1024, 14, 32), (128, 2048, 7, 32)]  # ResNet-50-GN
IMPLS = ["fastpurify", "composition", "F.group_norm"]


def composition(x, weight, bias, mask, noise, noise_bias, num_groups, groups=2):
    """The plain PyTorch way: per batch group, F.group_norm with the masked, perturbed affine."""
    return torch.cat([F.group_norm(xg, num_groups, weight * (mask + noise[g]), bias * (1 + noise_bias[g]))
                      for g, xg in enumerate(x.chunk(groups))])


def gn_inputs(shape, channels_last):
    n, c, side, _ = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = 1 + 2 * torch.randn(n, c, side, side, device="cuda", generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    frozen = dict(weight=torch.rand(c, device="cuda", generator=g) + 0.5,
                  bias=torch.randn(c, device="cuda", generator=g))
    learned = dict(mask=torch.rand(c, device="cuda", generator=g),
                   noise=(torch.rand(2, c, device="cuda", generator=g) - 0.5) * 0.8,
                   noise_bias=(torch.rand(2, c, device="cuda", generator=g) - 0.5) * 0.8)
    for t in learned.values():
        t.requires_grad_()
    return x.requires_grad_(), frozen, learned


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}x{s[2]}-g{s[3]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_gn_forward_backward(benchmark, impl, shape, channels_last):
    num_groups = shape[3]
    benchmark.group = f"gn-fwd+bwd {'x'.join(map(str, shape[:3]))}x{shape[2]} g{num_groups} " \
                      f"{'nhwc' if channels_last else 'nchw'}"
    x, frozen, learned = gn_inputs(shape, channels_last)
    dy = torch.randn_like(x)
    if impl == "F.group_norm":
        weight = (frozen["weight"] * learned["mask"]).detach().requires_grad_()
        bias = frozen["bias"].detach().clone().requires_grad_()
        inputs = [x, weight, bias]

        def forward():
            return F.group_norm(x, num_groups, weight, bias)
    else:
        inputs = [x, *learned.values()]
        fn = (lambda *a: FP.perturbed_group_norm(*a, num_groups=num_groups, groups=2)) if impl == "fastpurify" \
            else (lambda *a: composition(*a, num_groups))

        def forward():
            return fn(x, frozen["weight"], frozen["bias"], learned["mask"], learned["noise"], learned["noise_bias"])

    def run():
        grads = torch.autograd.grad(forward(), inputs, dy)
        torch.cuda.synchronize()
        return grads

    grads = benchmark(run)
    assert grads[0].shape == x.shape
    nbytes = 5 * x.numel() * x.element_size()  # forward: x, y; backward: x, dy, dx
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


def test_fused_matches_the_composition():
    """The cross-check behind the timings: fused and composed agree (values and gradients)."""
    shape = (8, 64, 14, 1)
    for channels_last in (False, True):
        x, frozen, learned = gn_inputs(shape, channels_last)
        args = (x, frozen["weight"], frozen["bias"], *learned.values())
        dy = torch.randn_like(x)
        fused = FP.perturbed_group_norm(*args, num_groups=1, groups=2)
        composed = composition(*args, 1)
        assert torch.allclose(fused, composed, atol=1e-4)
        for a, b in zip(torch.autograd.grad(fused, [x, *learned.values()], dy),
                        torch.autograd.grad(composed, [x, *learned.values()], dy)):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
