import math

import pytest
import torch

from fastpurify.backdoor import SIG, BadNets, Blend, WaNet, make_attack
from fastpurify.backdoor.badnets import PATCH
from fastpurify.validation import InputError

ALL = [BadNets, Blend, SIG, WaNet]


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (2, 1, 8, 5), (3, 5, 9, 17)])
def test_badnets_patch_bottom_right_on_every_channel(shape):
    x = torch.rand(shape)
    before = x.clone()
    out = BadNets(num_classes=10).trigger(x)
    assert torch.equal(x, before)  # input untouched
    patch = torch.tensor(PATCH)
    assert torch.equal(out[..., -3:, -3:], patch.expand(shape[0], shape[1], 3, 3))
    rest = torch.ones(shape[-2:], dtype=torch.bool)
    rest[-3:, -3:] = False
    assert torch.equal(out[..., rest], x[..., rest])


def test_badnets_official_values():
    # The official ANP checkerboard_1corner trigger, rows top to bottom, at rows/cols 29..31 of 32.
    out = BadNets(num_classes=10).trigger(torch.full((1, 1, 32, 32), 0.5))[0, 0]
    assert out[29:, 29:].tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert out[28, 29:].tolist() == [0.5] * 3 and out[29:, 28].tolist() == [0.5] * 3


def test_badnets_needs_3x3():
    with pytest.raises(InputError, match="at least 3x3"):
        BadNets(num_classes=10).trigger(torch.rand(1, 3, 2, 8))


def test_blend_formula_and_seeded_pattern(images):
    attack = Blend(num_classes=10, seed=4)
    p = attack.pattern(*images.shape[1:])
    assert torch.allclose(attack.trigger(images), 0.8 * images + 0.2 * p)
    assert torch.equal(p, Blend(num_classes=10, seed=4).pattern(*images.shape[1:]))
    assert not torch.equal(p, Blend(num_classes=10, seed=5).pattern(*images.shape[1:]))
    assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0 and p.std() > 0.2


def test_blend_custom_pattern_and_alpha():
    x = torch.rand(2, 1, 4, 4)
    pattern = torch.ones(1, 4, 4)
    out = Blend(num_classes=3, alpha=0.5, pattern=pattern).trigger(x)
    assert torch.allclose(out, 0.5 * x + 0.5)
    with pytest.raises(InputError, match="pattern has shape"):
        Blend(num_classes=3, pattern=pattern).trigger(torch.rand(1, 3, 4, 4))
    with pytest.raises(InputError, match="alpha"):
        Blend(num_classes=3, alpha=0.0)


def test_sig_horizontal_sinusoid():
    x = torch.full((2, 3, 6, 24), 0.5)
    out = SIG(num_classes=10).trigger(x)
    j = torch.arange(24, dtype=torch.float64)
    expected = 0.5 + (20 / 255) * torch.sin(2 * math.pi * j * 6 / 24)
    assert torch.allclose(out, expected.float().expand_as(out), atol=1e-6)
    assert torch.equal(out[:, :, 0], out[:, :, 5])  # the same in every row: it varies along columns


def test_sig_is_clean_label():
    attack = SIG(num_classes=10, target=3)
    labels = torch.tensor([3, 3, 3])
    _, new_labels = attack.apply(torch.rand(3, 1, 8, 8), labels)
    assert torch.equal(new_labels, labels)
    assert attack.poison_candidates(torch.tensor([0, 3, 5, 3])).tolist() == [False, True, False, True]
    assert attack.target_labels(torch.tensor([0, 5])).tolist() == [3, 3]
    with pytest.raises(InputError, match="clean-label"):
        SIG(num_classes=10, mode="all2all")


def test_wanet_is_a_small_smooth_seeded_warp():
    attack = WaNet(num_classes=10, seed=1)
    h = w = 32
    grid = attack.grid(h, w)
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    shift = (grid[0] - identity) * (w - 1) / 2  # in pixels
    assert float(shift.abs().max()) < 2.0 and float(shift.abs().mean()) > 0.05
    inner = shift[3:-3, 3:-3]  # away from the border, where the grid is clamped to the image
    assert float((inner[1:] - inner[:-1]).abs().max()) < 0.2  # smooth: neighbours move alike
    assert float((inner[:, 1:] - inner[:, :-1]).abs().max()) < 0.2
    assert float(grid.abs().max()) <= 1.0
    x = torch.rand(4, 3, h, w)
    out = attack.trigger(x)
    assert torch.equal(out, WaNet(num_classes=10, seed=1).trigger(x))
    assert not torch.equal(out, WaNet(num_classes=10, seed=2).trigger(x))
    assert 0 < float((out - x).abs().mean()) < 0.2
    const = attack.trigger(torch.full((1, 2, h, w), 0.7))
    assert torch.allclose(const, torch.full_like(const, 0.7), atol=1e-5)  # a warp moves pixels, adds none


def test_wanet_any_shape_and_noise_mode():
    attack = WaNet(num_classes=10, strength=0.5, grid_size=4)
    x = torch.rand(3, 1, 12, 20)
    assert attack.trigger(x).shape == x.shape
    g = torch.Generator().manual_seed(0)
    noisy = attack.noise(x, generator=g)
    assert noisy.shape == x.shape and not torch.allclose(noisy, attack.trigger(x))
    assert float((noisy - attack.trigger(x)).abs().max()) < 0.5


@pytest.mark.parametrize("cls", [c for c in ALL if not c.clean_label])
def test_all_to_all_labels(cls):
    attack = cls(num_classes=4, mode="all2all")
    labels = torch.tensor([0, 1, 2, 3])
    _, new = attack.apply(torch.rand(4, 1, 8, 8), labels)
    assert new.tolist() == [1, 2, 3, 0]
    assert attack.asr_eligible(labels).all()


@pytest.mark.parametrize("cls", ALL)
def test_all_to_one_labels_and_interface(cls):
    attack = cls(num_classes=5, target=2, seed=0)
    x, y = torch.rand(5, 2, 10, 10), torch.arange(5)
    out, new = attack.apply(x, y)
    assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    assert attack.target_labels(y).tolist() == [2] * 5
    assert new.tolist() == (y.tolist() if attack.clean_label else [2] * 5)
    assert attack.asr_eligible(y).tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("cls", ALL)
def test_bad_input(cls):
    with pytest.raises(InputError, match="target 10 is outside"):
        cls(num_classes=10, target=10)
    with pytest.raises(InputError, match="mode"):
        cls(num_classes=10, mode="one2one")
    attack = cls(num_classes=10)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        attack.trigger(torch.rand(2, 3, 8, 8) * 3)
    with pytest.raises(InputError, match="NaN"):
        attack.trigger(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(InputError, match="rank 4"):
        attack.trigger(torch.rand(3, 8, 8))
    with pytest.raises(InputError, match=r"\[0, 9\]"):
        attack.apply(torch.rand(2, 3, 8, 8), torch.tensor([0, 10]))


def test_make_attack_by_name():
    assert isinstance(make_attack("wanet", num_classes=10), WaNet)
    with pytest.raises(InputError, match="unknown attack"):
        make_attack("trojannn", num_classes=10)
