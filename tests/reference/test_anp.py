"""Reference ANP against a hand computation in float64 (autograd.grad on the formulas)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify._torchvision import import_torchvision
from fastpurify.data import DeviceBatchSampler, make_generator
from fastpurify.masks import load_masks
from fastpurify.models import small_cnn
from fastpurify.reference import anp
from fastpurify.reference.anp import ANPState

NAMES = ("bn2", "bn1")  # model order


class Tiny(nn.Module):
    """conv - BatchNorm2d - ReLU - pool - linear - BatchNorm1d - ReLU - linear, in float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(12, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        h = F.avg_pool2d(F.relu(self.bn2(self.conv(x))), 3).flatten(1)
        return self.fc2(F.relu(self.bn1(self.fc1(h))))


def tiny_model():
    torch.manual_seed(0)
    model = Tiny().double()
    for bn in (model.bn2, model.bn1):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model


def data(n=10):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def batch_norm(h, bn, scale, shift):
    """Training-mode BatchNorm written out: (x - mean) / sqrt(biased var + eps) * scale + shift."""
    dims = [0] + list(range(2, h.dim()))
    shape = [1, -1] + [1] * (h.dim() - 2)
    mu = h.mean(dim=dims, keepdim=True)
    var = ((h - mu) ** 2).mean(dim=dims, keepdim=True)
    return (h - mu) / torch.sqrt(var + bn.eps) * scale.view(shape) + shift.view(shape)


def forward(model, x, m, delta=None, xi=None):
    """The network with masks m; perturbed when delta and xi are given."""
    def bn(h, name):
        layer = getattr(model, name)
        if delta is None:
            return batch_norm(h, layer, layer.weight * m[name], layer.bias)
        return batch_norm(h, layer, layer.weight * (m[name] + delta[name]), layer.bias * (1 + xi[name]))

    h = F.avg_pool2d(F.relu(bn(model.conv(x), "bn2")), 3).flatten(1)
    return model.fc2(F.relu(bn(model.fc1(h), "bn1")))


def hand_iteration(model, x, y, m, buf, delta, xi, *, eps, steps, alpha, clamp, lr=0.2, momentum=0.9):
    """One ANP iteration from the paper's formulas, given the noise draw."""
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_() for k, v in (*delta.items(), *((f"xi.{k}", v) for k, v in xi.items()))}
        d = {k: leaves[k] for k in NAMES}
        z = {k: leaves[f"xi.{k}"] for k in NAMES}
        ce = F.cross_entropy(forward(model, x, m, d, z), y)
        grads = dict(zip(leaves, torch.autograd.grad(ce, list(leaves.values()))))
        delta = {k: delta[k] + eps / steps * grads[k].sign() for k in NAMES}
        xi = {k: xi[k] + eps / steps * grads[f"xi.{k}"].sign() for k in NAMES}
        if clamp:
            delta = {k: v.clamp(-eps, eps) for k, v in delta.items()}
            xi = {k: v.clamp(-eps, eps) for k, v in xi.items()}
    mv = {k: v.clone().requires_grad_() for k, v in m.items()}
    loss = alpha * F.cross_entropy(forward(model, x, mv), y) + (1 - alpha) * F.cross_entropy(
        forward(model, x, mv, delta, xi), y)
    grads = dict(zip(NAMES, torch.autograd.grad(loss, [mv[k] for k in NAMES])))
    buf = {k: grads[k] if buf is None else momentum * buf[k] + grads[k] for k in NAMES}
    m = {k: (m[k] - lr * buf[k]).clamp(0, 1) for k in NAMES}
    return m, buf, delta, xi


def draw_noise(generator, eps):
    """The documented draw: one flat vector of every delta (model order), then every xi."""
    sizes = [3, 5]
    d, z = torch.empty(16, dtype=torch.float64).uniform_(-eps, eps, generator=generator).chunk(2)
    return dict(zip(NAMES, d.split(sizes))), dict(zip(NAMES, z.split(sizes)))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("clamp", [True, False])
def test_one_iteration_matches_the_hand_computation(steps, clamp):
    eps, alpha = 0.3, 0.2
    model = tiny_model()
    x, y = data()
    state = ANPState(model, eps=eps, steps=steps, alpha=alpha, clamp_noise=clamp)
    loss = state.iteration(x, y, make_generator(5))
    delta0, xi0 = draw_noise(make_generator(5), eps)
    ones = {k: torch.ones(getattr(model, k).num_features, dtype=torch.float64) for k in NAMES}
    m, buf, delta, xi = hand_iteration(model, x, y, ones, None, delta0, xi0, eps=eps, steps=steps, alpha=alpha,
                                       clamp=clamp)
    for k in NAMES:
        layer = state.layers[k]
        torch.testing.assert_close(layer.neuron_noise.detach(), delta[k])
        torch.testing.assert_close(layer.neuron_noise_bias.detach(), xi[k])
        torch.testing.assert_close(state.mask_optimizer.state[layer.neuron_mask]["momentum_buffer"], buf[k])
        torch.testing.assert_close(layer.neuron_mask.detach(), m[k])
        assert 0 <= float(m[k].min()) and float(m[k].max()) <= 1
    assert any(bool((m[k] < 1).any()) for k in NAMES), "the masks moved"
    outside = any(bool((v.abs() > eps + 1e-12).any()) for v in (*delta.values(), *xi.values()))
    assert outside != clamp, "without the clamp the script's noise leaves [-eps, eps]; with it, never"
    with torch.no_grad():
        expected = alpha * F.cross_entropy(forward(model, x, ones), y) + (1 - alpha) * F.cross_entropy(
            forward(model, x, ones, delta, xi), y)
    assert loss == pytest.approx(float(expected))


def test_anp_follows_the_documented_random_draws_and_momentum():
    """Two iterations through anp(): batches from the sampler seeded with seed, noise from a
    generator seeded with seed + 1, the mask momentum carried over."""
    eps, seed, batch = 0.4, 7, 6
    model = tiny_model()
    x, y = data()
    result = anp(model, (x, y), iterations=2, batch_size=batch, padding=1, seed=seed, eps=eps, progress=False)
    sampler = DeviceBatchSampler(x, y, batch, seed=seed, padding=1)
    noise = make_generator(seed + 1)
    m = {k: torch.ones(getattr(model, k).num_features, dtype=torch.float64) for k in NAMES}
    buf = None
    for _ in range(2):
        xb, yb = sampler.sample()
        delta, xi = draw_noise(noise, eps)
        m, buf, _, _ = hand_iteration(model, xb, yb, m, buf, delta, xi, eps=eps, steps=1, alpha=0.2, clamp=True)
    assert list(result.masks) == list(NAMES)
    for k in NAMES:
        torch.testing.assert_close(result.masks[k], m[k])  # float64 model: float64 masks
    assert len(result.loss) == 2 and result.settings["iterations"] == 2


def test_the_users_model_is_untouched_and_runs_are_seeded(tmp_path):
    model = small_cnn(num_classes=4, in_channels=1, width=4)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 4, (20,))
    a = anp(model, (x, y), iterations=3, batch_size=8, seed=1, progress=False)
    b = anp(model, (x, y), iterations=3, batch_size=8, seed=1, progress=False)
    c = anp(model, (x, y), iterations=3, batch_size=8, seed=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    assert list(a.masks) == ["features.1", "features.4", "features.8", "features.11"] and a.num_neurons == 24
    back = load_masks(a.save(tmp_path / "mask_values.txt"))
    assert all(torch.allclose(back[k], a.masks[k], atol=5.01e-5) for k in a.masks)


def test_torchvision_model():
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=3)
    result = anp(model, (torch.rand(6, 3, 32, 32), torch.randint(0, 3, (6,))), iterations=1, batch_size=4,
                 progress=False)
    assert len(result.masks) == 20 and result.masks["layer4.1.bn2"].shape == (512,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=0.0), r"eps \(the noise bound\) must be a positive"),
    (dict(eps=-0.1), r"eps \(the noise bound\) must be a positive"),
    (dict(alpha=1.5), r"alpha \(the clean-loss weight\) must lie in \[0, 1\]"),
    (dict(alpha=-0.1), r"alpha \(the clean-loss weight\) must lie in \[0, 1\]"),
    (dict(iterations=0), "iterations must be a positive integer"),
    (dict(steps=0), r"steps \(noise steps per iteration\) must be a positive integer"),
    (dict(lr=0), r"lr \(the mask learning rate\) must be a positive"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_settings_fail_before_any_work(kwargs, message):
    class Refuses(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x):
            raise AssertionError("no forward may run")

    with pytest.raises(InputError, match=message):
        anp(Refuses(), (torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64)), progress=False, **kwargs)


def test_a_model_without_norm_layers_is_refused_with_the_options_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(InputError, match=r"no layer to mask among batchnorm, layernorm.*mask_layers=\('conv_linear',\)"):
        anp(model, (torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64)), progress=False)
    with pytest.raises(InputError, match=r"no layer to mask among conv_linear"):  # the classifier is never masked
        anp(model, (torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64)), progress=False,
            mask_layers=("conv_linear",))
