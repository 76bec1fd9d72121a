"""The fused eval BatchNorm routing for attacks on a frozen model (fastpurify.eval_norms): the same
output and input gradient as the module's own eval forward (float64, every BatchNorm type, both
layouts, odd sizes, with and without affine), the module's own forward wherever the kernels do not
apply, live parameters, nothing left on the model afterwards, and the PGD and PBE engines using it
with results equal to PyTorch's BatchNorm."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpurify
from fastpurify import eval_norms
from fastpurify.engines.pbe import PBEEngine
from fastpurify.engines.pgd import PGDAttack
from fastpurify.eval_norms import EvalNorms, routable
from fastpurify.functional import backend_for
from fastpurify.models import small_cnn
from fastpurify.purification import DEFAULT_SCHEDULE, plan_pbe

from .devices import TEST_DEVICE, float64_tol, on_device
from .stubs import CalledTwice

# (type, input shape, channels_last)
CASES = [(nn.BatchNorm1d, (7, 5), False), (nn.BatchNorm1d, (6, 3, 11), False), (nn.BatchNorm2d, (5, 3, 7, 9), False),
         (nn.BatchNorm2d, (5, 3, 7, 9), True), (nn.BatchNorm2d, (4, 70, 5, 5), True), (nn.BatchNorm2d, (3, 33, 6, 6), False),
         (nn.BatchNorm3d, (2, 4, 3, 5, 6), False), (nn.SyncBatchNorm, (5, 6, 4, 3), True)]


def frozen_norm(kind, c, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = kind(c, affine=affine).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.3)
        if affine:
            m.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return on_device(m.eval().requires_grad_(False))


def inputs(shape, channels_last, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = on_device(torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(), on_device(torch.randn(shape, generator=g, dtype=torch.float64))


def output_and_grad(module, x, dy):
    y = module(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


def count_fused_calls(monkeypatch):
    calls = []
    original = eval_norms.FP.perturbed_batch_norm

    def counted(*args, **kwargs):
        calls.append(kwargs.get("training"))
        return original(*args, **kwargs)
    monkeypatch.setattr(eval_norms.FP, "perturbed_batch_norm", counted)
    return calls


@pytest.mark.parametrize("kind,shape,channels_last", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("affine", [True, False])
def test_routed_norm_equals_the_module(kind, shape, channels_last, affine, monkeypatch):
    module = frozen_norm(kind, shape[1], affine)
    x, dy = inputs(shape, channels_last)
    want_y, want_dx = output_and_grad(module, x, dy)
    norms = EvalNorms(module)
    assert len(norms) == 1
    calls = count_fused_calls(monkeypatch)
    with norms.active():
        y, dx = output_and_grad(module, x, dy)
    assert calls == [False]  # the fused eval path ran, once
    tol = float64_tol(backend_for(x))
    torch.testing.assert_close(y, want_y, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, want_dx, rtol=tol, atol=tol)
    assert y.is_contiguous(memory_format=torch.channels_last) == want_y.is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_float32_and_bfloat16_agree_with_pytorch_to_rounding(dtype, tol):
    """float32 parameters; the activations float32, or bfloat16 as under bf16 autocast (y and dx
    come back in the activations' dtype, as PyTorch's)."""
    module = frozen_norm(nn.BatchNorm2d, 16).float()
    x = on_device(torch.randn(8, 16, 9, 9, generator=torch.Generator().manual_seed(2))).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn_like(x)
    want_y, want_dx = output_and_grad(module, x, dy)
    with EvalNorms(module).active():
        y, dx = output_and_grad(module, x, dy)
    assert y.dtype == want_y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y, want_y, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, want_dx, rtol=tol, atol=tol)


def test_the_model_is_left_as_it_was():
    model = on_device(small_cnn(num_classes=4, in_channels=3, width=8).double().eval())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = on_device(torch.rand(3, 3, 12, 12, dtype=torch.float64))
    want = model(x)
    norms = EvalNorms(model)
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    with norms.active():
        assert all("forward" in m.__dict__ for m in norms.modules)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), want)


def test_routing_is_removed_when_the_block_raises():
    module = frozen_norm(nn.BatchNorm2d, 3)
    with pytest.raises(RuntimeError, match="inside"):
        with EvalNorms(module).active():
            raise RuntimeError("inside")
    assert "forward" not in module.__dict__


def test_the_module_runs_its_own_forward_where_the_kernels_do_not_apply(monkeypatch):
    x, dy = inputs((4, 3, 5, 5), False)
    calls = count_fused_calls(monkeypatch)
    # training mode: batch statistics and running-statistic updates, the module's own
    module = frozen_norm(nn.BatchNorm2d, 3)
    with EvalNorms(module).active():
        module.train()
        y = module(x)
    reference = frozen_norm(nn.BatchNorm2d, 3).train()
    assert torch.equal(y, reference(x)) and torch.equal(module.running_mean, reference.running_mean)
    # a weight that requires a gradient while autograd is on: the module's own (weight gradients)
    module = frozen_norm(nn.BatchNorm2d, 3).requires_grad_(True)
    with EvalNorms(module).active():
        module(x).sum().backward()
    assert module.weight.grad is not None
    assert calls == []


def test_which_norms_are_routed():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    assert routable(nn.BatchNorm2d(3)) and routable(nn.SyncBatchNorm(3))
    assert not routable(Shifted(3))  # a subclass may compute something else
    assert not routable(nn.BatchNorm2d(3, track_running_stats=False))  # batch statistics even in eval mode
    assert not routable(nn.GroupNorm(1, 3)) and not routable(nn.LayerNorm(3))
    replaced = nn.BatchNorm2d(3)
    replaced.forward = lambda x: x  # the user's own instance-level forward is left alone
    assert not routable(replaced)


def test_the_kernels_read_the_live_parameters():
    """A CUDA graph captured through the routing replays with whatever the optimizer wrote since."""
    module = frozen_norm(nn.BatchNorm2d, 4)
    x, dy = inputs((3, 4, 5, 5), True)
    norms = EvalNorms(module)
    with torch.no_grad():
        module.weight.mul_(-2)
        module.running_var.add_(1)
    want = output_and_grad(module, x, dy)
    with norms.active():
        got = output_and_grad(module, x, dy)
    tol = float64_tol(backend_for(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _subject(seed=0):
    torch.manual_seed(seed)
    model = small_cnn(num_classes=5, in_channels=3, width=8).double()
    with torch.no_grad():  # running statistics away from (0, 1), so that a dropped one shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 12, 12, generator=g, dtype=torch.float64)
    return on_device(model), on_device(x), on_device(torch.randint(0, 5, (6,), generator=g))


@pytest.mark.parametrize("channels_last", [False, True])
def test_pgd_through_the_fused_norms_equals_pytorch_batch_norm(channels_last, monkeypatch):
    model, x, y = _subject()
    plain = fastpurify.pgd(model, x, y, steps=3, seed=0, fused_norms=False, channels_last=channels_last,
                           cuda_graph=False)
    calls = count_fused_calls(monkeypatch)
    fused = fastpurify.pgd(model, x, y, steps=3, seed=0, fused_norms=True, channels_last=channels_last,
                           cuda_graph=False)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # every BatchNorm, three steps, and the first chunk's check of the traced model (ReLUs folded) and the model
    assert norms > 0 and len(calls) == (3 + 2) * norms
    # float64 gradients that differ in the last places give the same signs, so the same examples
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_engines_choose_the_fused_norms_on_cuda_only():
    model, _, _ = _subject()
    attack = PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=1)
    assert (attack.norms is not None) == (TEST_DEVICE.type == "cuda")
    assert PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=1, fused_norms=True).norms is not None
    assert PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=1, fused_norms=False).norms is None
    images = torch.rand(8, 3, 12, 12, dtype=torch.float64)
    plan = plan_pbe(model, None, (images, torch.randint(0, 5, (8,))), device=TEST_DEVICE, poison_indices=None,
                    test_data=None, attack=None, batch_size=4, adv_epochs=1, clean_epochs=0,
                    schedule=DEFAULT_SCHEDULE, eps=8 / 255, alpha=None, pgd_steps=1, random_start=False,
                    regenerate="round", lr=1e-3, momentum=0.9, weight_decay=5e-4, augment=False, padding=0,
                    flip=False, seed=0)
    engine = PBEEngine(model, plan, device=TEST_DEVICE, channels_last=False, cuda_graph=False, precision="fp32",
                       pgd_batch_size=4, score_batch_size=4, fused_norms=True)
    assert len(engine.attack.norms) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_pbe_round_through_the_fused_norms_equals_pytorch_batch_norm():
    model, x, y = _subject(1)
    kw = dict(clean_data=(x, y), eps=8 / 255, adv_epochs=1, clean_epochs=1, batch_size=3, augment=False, padding=0,
              flip=False, progress=False, device=TEST_DEVICE, cuda_graph=False, channels_last=False)
    fused, _ = fastpurify.pbe(model, fused_norms=True, **kw)
    plain, _ = fastpurify.pbe(model, fused_norms=False, **kw)
    for (name, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert F.mse_loss(fused(x), plain(x)) < 1e-20


class Preact(nn.Module):
    """relu(bn(x)) twice (both fold), and a BatchNorm feeding a residual (it does not)."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv, self.bn2, self.bn3 = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), \
            nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)
        self.flip = False  # read at trace time: changing it later makes the traced graph stale

    def forward(self, x):
        y = self.conv(torch.relu(self.bn1(x)))
        y = self.bn3(nn.functional.relu(self.bn2(y)) + x)
        y = -y if self.flip else y
        return self.head(y.mean((2, 3)))


def _frozen(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return on_device(model.double().eval().requires_grad_(False))


def test_the_relus_the_norms_feed_are_folded_and_the_traced_model_is_the_model():
    torch.manual_seed(0)
    model = _frozen(Preact())
    norms = EvalNorms(model)
    assert len(norms) == 3 and norms.folded == 2 and norms.traced is not model
    x = on_device(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    want = model(x)
    with norms.active() as forward:
        assert forward is norms.traced
        got, own = forward(x), model(x)  # the model itself still right while routed (ReLU twice is ReLU)
    tol = float64_tol(backend_for(x))
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(own, want, rtol=tol, atol=tol)
    assert EvalNorms(model, fold_relu=False).folded == 0


def test_a_norm_the_model_calls_twice_keeps_its_relu_apart():
    torch.manual_seed(0)
    model = _frozen(CalledTwice())
    norms = EvalNorms(model)
    assert len(norms) == 1 and norms.folded == 0
    x = on_device(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    with norms.active() as forward:
        got = forward(x)
    tol = float64_tol(backend_for(x))
    torch.testing.assert_close(got, model(x), rtol=tol, atol=tol)


def test_nothing_is_folded_in_a_model_with_forward_hooks():
    model = _frozen(Preact())
    model.bn1.register_forward_hook(lambda m, i, o: None)
    norms = EvalNorms(model)
    assert norms.folded == 0 and norms.traced is model


def test_pgd_checks_the_traced_model_once_and_falls_back_when_it_is_stale():
    torch.manual_seed(0)
    model = _frozen(Preact())
    attack = PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=2, fused_norms=True)
    assert attack.norms.folded == 2
    model.flip = True  # the traced graph kept the branch of trace time
    x, y = on_device(torch.rand(4, 3, 5, 5, dtype=torch.float64)), on_device(torch.tensor([0, 1, 2, 3]))
    with pytest.warns(RuntimeWarning, match="computes other logits"):
        adv = attack.attack(x, y, random_start=False, generator=None, batch_size=4)
    assert attack.norms.folded == 0
    plain = PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=2, fused_norms=False)
    torch.testing.assert_close(adv, plain.attack(x, y, random_start=False, generator=None, batch_size=4),
                               rtol=0, atol=1e-12)


class StaleRelu(nn.Module):
    """bn1 feeds only a ReLU when traced; setting ``skip`` later makes that trace stale."""

    def __init__(self):
        super().__init__()
        self.bn1, self.head = nn.BatchNorm2d(3), nn.Linear(3, 4)
        self.skip = False

    def forward(self, x):
        y = self.bn1(x)
        return self.head((y if self.skip else torch.relu(y)).mean((2, 3)))


def test_unfolding_inside_the_routing_stops_the_folded_relus_at_once():
    """After :meth:`EvalNorms.unfold` (the attack's check found the trace stale), the routed modules
    no longer apply the ReLU the trace had left to them, in the same ``active`` block."""
    torch.manual_seed(0)
    model = _frozen(StaleRelu())
    norms = EvalNorms(model)
    assert norms.folded == 1
    model.skip = True
    x = on_device(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    want = model(x)
    with norms.active():
        norms.unfold()
        got = model(x)
    tol = float64_tol(backend_for(x))
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
