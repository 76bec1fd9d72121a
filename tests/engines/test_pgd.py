"""The fast PGD engine against the reference (float64, both norms, seeded random starts, any
chunking), the model coming back as it was, the memory back-off, and bad input."""

import warnings

import pytest
import torch
import torch.nn as nn

import fastpurify
from fastpurify import InputError
from fastpurify.engines import runtime
from fastpurify.engines.pgd import PGDAttack
from fastpurify.inference import eval_mode
from fastpurify.models import small_cnn
from fastpurify.reference import pgd as reference_pgd
from fastpurify.training import train_classifier

SETTINGS = {"linf": dict(eps=8 / 255, alpha=2 / 255), "l2": dict(eps=0.5, alpha=0.1)}



@pytest.fixture(scope="module")
def fitted():
    """A float64 BN CNN fitted to 13 random images (so its loss has somewhere to rise)."""
    torch.manual_seed(0)
    model = small_cnn(num_classes=5, in_channels=3, width=4).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(13, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (13,), generator=g)
    train_classifier(model, x, y, epochs=20, lr=0.05, batch_size=13, augment=False, progress=False)
    model.zero_grad(set_to_none=True)
    return model, x, y


def _loss(model, x, y):
    with torch.no_grad(), eval_mode(model):
        return float(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("batch_size", [1, 5, 512])
def test_equals_the_reference_in_float64(fitted, norm, random_start, batch_size):
    model, x, y = fitted
    kw = dict(SETTINGS[norm], steps=4, norm=norm, random_start=random_start, seed=7)
    ref = reference_pgd(model, x, y, **kw)
    fast = fastpurify.pgd(model, x, y, batch_size=batch_size, **kw)
    assert fast.dtype == torch.float64 and fast.shape == x.shape and not fast.requires_grad
    assert float((fast - ref).abs().max()) < 1e-6
    assert float((fast - x).abs().max()) > 1e-3, "the attack moved the images"
    assert _loss(model, fast, y) > _loss(model, x, y)


def test_kernels_through_the_interpreter_equal_the_reference(fitted, backend):
    model, x, y = fitted
    for norm in ("linf", "l2"):
        kw = dict(SETTINGS[norm], steps=3, norm=norm, random_start=True, seed=1)
        assert float((fastpurify.pgd(model, x, y, batch_size=4, **kw) - reference_pgd(model, x, y, **kw)).abs().max()) \
            < 1e-6


def test_a_generator_continues_its_stream(fitted):
    model, x, y = fitted
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(2):  # the second call draws what follows the first call's draws, in both
        a = fastpurify.pgd(model, x, y, steps=2, generator=g1)
        b = reference_pgd(model, x, y, steps=2, generator=g2)
        assert float((a - b).abs().max()) < 1e-6


def test_the_model_comes_back_as_it_was_and_gets_no_gradients(fitted):
    model, x, y = fitted
    model.train()
    model.features[1].eval()
    model.features[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastpurify.pgd(model, x, y, steps=2)
    assert model.training and not model.features[1].training
    assert not model.features[0].weight.requires_grad and model.features[1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "eval mode: no BN stat updates"
    model.eval()
    model.features[0].weight.requires_grad_(True)


def test_constraints_hold_in_a_tight_pixel_box(fitted):
    model, x, y = fitted
    x = x.clamp(0.25, 0.75)
    for norm in ("linf", "l2"):
        adv = fastpurify.pgd(model, x, y, steps=6, norm=norm, lo=0.25, hi=0.75, seed=0, **SETTINGS[norm])
        assert float(adv.min()) >= 0.25 and float(adv.max()) <= 0.75
        if norm == "linf":
            assert float((adv - x).abs().max()) <= SETTINGS[norm]["eps"] + 1e-9
        else:
            assert float((adv - x).flatten(1).norm(dim=1).max()) <= SETTINGS[norm]["eps"] + 1e-9


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than ``limit`` (as a GPU would)."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_chunk_and_changes_nothing(fitted):
    model, x, y = fitted
    with pytest.warns(RuntimeWarning) as record:
        adv = fastpurify.pgd(OutOfMemoryAbove(model, 3), x, y, steps=3, seed=2, batch_size=13)
    assert [str(w.message) for w in record] == [f"PGD ran out of GPU memory; attacking {k} image(s) at a time"
                                                for k in (6, 3)]
    assert float((adv - reference_pgd(model, x, y, steps=3, seed=2)).abs().max()) < 1e-6
    with pytest.raises(torch.cuda.OutOfMemoryError), pytest.warns(RuntimeWarning, match="1 image"):
        fastpurify.pgd(OutOfMemoryAbove(model, 0), x, y, steps=1, batch_size=2)  # nothing fits: the error


def test_graph_cache_captures_a_shape_at_its_nth_use(monkeypatch):
    """The policy (GPU-free: capture is replaced by a recorder): eager until the n-th use of a
    key, then the captured step; a failed capture stays eager."""
    calls = []

    class Captured:
        def __call__(self):
            calls.append("replay")

    outcomes = iter([Captured(), None])
    monkeypatch.setattr(runtime.GraphedStep, "try_capture", classmethod(lambda cls, *a, **k: next(outcomes)))
    cache = runtime.GraphCache(True, after=2)
    step = lambda: calls.append("eager")  # noqa: E731
    for key in ("a", "a", "a", "b", "b", "b"):
        cache.run(key, step, [], [])
    assert calls == ["eager", "replay", "replay", "eager", "eager", "eager"]
    assert cache.captured == 1
    off = runtime.GraphCache(False)
    off.run("a", step, [], [])
    assert calls[-1] == "eager" and not off.graphs


def test_pgd_attack_reuses_its_buffers_per_shape(fitted):
    model, x, y = fitted
    attack = PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=2)
    with attack.prepared():
        a = attack(x[:4], y[:4])
        b = attack(x[4:8], y[4:8])
        c = attack(x[:3], y[:3])
    assert len(attack._buffers) == 2 and a.data_ptr() != b.data_ptr(), "results are copies of the static buffers"
    assert float((c - a[:3]).abs().max()) < 1e-12, "eval mode: an image's result does not depend on its chunk"


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=0), "eps .* must be a positive"),
    (dict(alpha=float("nan")), "alpha .* must be a positive"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(norm="l1"), "norm must be one of"),
    (dict(lo=1.0, hi=0.0), "lo < hi"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(precision="fp16"), "precision must be one of"),
    (dict(cuda_graph=True), "cuda_graph=True needs a model on a CUDA device"),
    (dict(seed=1, generator=torch.Generator()), "a seed or a generator"),
    (dict(hi=0.5), r"pixel range \[0.0, 0.5\]"),
])
def test_bad_settings_are_refused(fitted, kwargs, message):
    model, x, y = fitted
    with pytest.raises(InputError, match=message):
        fastpurify.pgd(model, x, y, **kwargs)


def test_bad_data_is_refused(fitted):
    model, x, y = fitted
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        fastpurify.pgd(model, bad, y)
    with pytest.raises(InputError, match="one label per image"):
        fastpurify.pgd(model, x, y[:5])
    with pytest.raises(InputError, match="rank 4"):
        fastpurify.pgd(model, x[0], y[:1])


def test_a_step_larger_than_the_ball_without_random_start_is_warned(fitted):
    model, x, y = fitted
    with pytest.warns(UserWarning, match="alpha=0.1 > eps=0.05"):
        fastpurify.pgd(model, x, y, eps=0.05, alpha=0.1, steps=1, random_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpurify.pgd(model, x, y, eps=0.05, alpha=0.1, steps=1, random_start=True)  # allowed, no warning
        fastpurify.pgd(model, x, y, eps=0.05, alpha=0.1, steps=1, norm="l2", random_start=False)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cuda_graph_equals_eager_and_the_reference(norm, exact_cuda):
    """In float64 with deterministic cuDNN (in float32 the fast engine's channels_last
    convolutions and the reference's sum in other orders, and sign steps flip on near-zero
    gradients: 92 % of pixels agreed on an H100)."""
    from fastpurify.models import build_model
    torch.manual_seed(0)
    model = build_model("preact_resnet18", num_classes=10, in_channels=3).cuda().double().eval()
    x = torch.rand(96, 3, 32, 32, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 10, (96,), device="cuda")
    kw = dict(SETTINGS[norm], steps=5, norm=norm, seed=3, tf32=False, batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed or mismatching capture would warn
        graphed = fastpurify.pgd(model, x, y, cuda_graph=True, **kw)
    eager = fastpurify.pgd(model, x, y, cuda_graph=False, **kw)
    ref = reference_pgd(model, x, y, **{k: v for k, v in kw.items() if k != "tf32"})
    assert float((graphed - eager).abs().max()) < 1e-5
    # sign flips of near-zero gradients can move a few pixels by 2 alpha; nearly all agree
    assert float(((graphed - ref).abs() < 1e-5).double().mean()) > 0.99


def _layouts_seen(model):
    """The memory formats of the batches the model's forward receives (a pre-hook)."""
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    return seen, handle


@pytest.mark.parametrize("dtype, expected", [(torch.float32, True), (torch.float64, False)])
def test_the_cpu_default_layout_follows_the_dtype(fitted, dtype, expected):
    """float32 on the CPU: the model sees channels_last batches (oneDNN is faster in it) and its
    own weights stay NCHW; float64 stays NCHW. channels_last=False forces NCHW."""
    model, x, y = fitted
    model, x = model.to(dtype), x.to(dtype)
    try:
        kw = dict(SETTINGS["linf"], steps=3, seed=5)
        seen, handle = _layouts_seen(model)
        fast = fastpurify.pgd(model, x, y, **kw)
        assert seen and set(seen) == {expected}
        seen.clear()
        fastpurify.pgd(model, x, y, channels_last=False, **kw)
        assert seen and not any(seen)
        handle.remove()
        assert all(p.is_contiguous() for p in model.parameters()), "the model itself is not converted"
        assert fast.is_contiguous() and fast.dtype == dtype
        ref = reference_pgd(model, x, y, **kw)
        assert float(((fast - ref).abs() < 1e-5).double().mean()) > 0.99
    finally:
        model.double()
