"""PBE's "auto" eps, flip and padding (fastpurify.calibration): each choice against a model whose
answer is known in closed form, the run's draws unchanged by calibrating, and bad values refused."""

import pytest
import torch
import torch.nn as nn

import fastpurify
from fastpurify import InputError
from fastpurify.calibration import (ADVERSARIAL_SHARE, adversarial_share, auto_eps, auto_padding, calibrate,
                                    describe_calibration)
from fastpurify.data import synthetic_dataset
from fastpurify.models import small_cnn
from fastpurify.reference import pbe as reference_pbe

SIZE = 8


class Brightness(nn.Module):
    """Two classes by mean brightness: logits (m - 0.5, 0.5 - m) * 100. An L-inf attack of
    bound eps moves the mean by at most eps, so an image whose mean is d from 0.5 is misclassified
    by PGD exactly when d < eps (7 steps of eps / 5 reach the bound). Flipping changes nothing."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m - 0.5, 0.5 - m], dim=1) * 100


class LeftHalf(nn.Module):
    """Class 0 when the left half is brighter than the right: a flip swaps every answer."""

    def forward(self, x):
        d = x[..., : SIZE // 2].mean(dim=(1, 2, 3)) - x[..., SIZE // 2:].mean(dim=(1, 2, 3))
        return torch.stack([d, -d], dim=1) * 100


def uniform_images(margins_in_pixels: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant images at 0.5 +- margin/255, alternately above (class 0) and below (class 1)."""
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(margins_in_pixels))])
    values = 0.5 + signs * torch.tensor(margins_in_pixels) / 255
    images = values.view(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE).contiguous()
    return images, (signs < 0).long()


@pytest.mark.parametrize("margins, expected", [
    ([3.5] * 70 + [11.5] * 20 + [20.5] * 10, 12),   # 70 % fall at 6/255, 90 % from 12/255
    ([3.5] * 80 + [40.5] * 20, 6),                  # 80 % at the paper's 6/255 already: kept
    ([2.5] * 50 + [7.5] * 29 + [25.5] * 21, 26),    # 79 % from 8/255: not enough until 26/255
])
def test_auto_eps_is_the_smallest_bound_that_misclassifies_enough(margins, expected):
    images, labels = uniform_images(margins)
    model = Brightness()
    chosen = auto_eps(model, images, labels, alpha=None, steps=7, batch_size=64)
    assert chosen["pixels"] == f"{expected}/255" and chosen["reached"]
    assert chosen["value"] == pytest.approx(expected / 255)
    share = lambda k: adversarial_share(model, images, labels, eps=k / 255, alpha=None, steps=7, batch_size=64)
    assert share(expected) >= ADVERSARIAL_SHARE
    if expected > 6:
        assert share(expected - 1) < ADVERSARIAL_SHARE  # the smallest such bound
    assert chosen["shares"][f"{expected}/255"] == pytest.approx(share(expected), abs=1e-4)


def test_auto_eps_stops_at_32_255_and_says_it_fell_short():
    images, labels = uniform_images([3.5] * 50 + [60.5] * 50)  # half the images beyond any bound searched
    chosen = auto_eps(Brightness(), images, labels, alpha=None, steps=7, batch_size=64)
    assert chosen["pixels"] == "32/255" and not chosen["reached"]
    assert chosen["shares"] == {"6/255": 0.5, "32/255": 0.5}
    assert "below the 80% sought" in describe_calibration({"eps": chosen})


def test_flip_is_kept_only_where_the_model_keeps_its_accuracy_on_flipped_images():
    images, labels = uniform_images([30.5] * 40)
    cfg = dict(eps=0.1, alpha=0.02, pgd_steps=7, batch_size=32, flip="auto", padding=3)
    record = calibrate(Brightness(), images, labels, cfg, seed=0)
    assert cfg["flip"] is True and record["flip"]["flipped_accuracy"] == record["flip"]["accuracy"] == 1.0
    half = torch.zeros(40, 1, SIZE, SIZE)
    half[::2, ..., : SIZE // 2] = 1.0  # class 0: left half bright
    half[1::2, ..., SIZE // 2:] = 1.0  # class 1: right half bright
    cfg = dict(eps=0.1, alpha=0.02, pgd_steps=7, batch_size=32, flip="auto", padding=3)
    record = calibrate(LeftHalf(), half, torch.arange(40) % 2, cfg, seed=0)
    assert cfg["flip"] is False and record["flip"] == {"value": False, "accuracy": 1.0, "flipped_accuracy": 0.0,
                                                       "retained": 0.9}
    assert cfg["padding"] == 3 and "padding" not in record and "eps" not in record  # only "auto" is touched


@pytest.mark.parametrize("side, padding", [(32, 4), (16, 2), (224, 28), (8, 1), (4, 1), (2, 1)])
def test_auto_padding_is_an_eighth_of_the_side(side, padding):
    assert auto_padding(side, side) == padding
    assert auto_padding(side, 2 * side) == padding  # the shorter side


def test_auto_settings_run_as_their_resolved_values_given_explicitly(monkeypatch):
    """The "auto" settings give the run the values they resolve to give explicitly, bit for bit
    (the calibration sample, here 30 of the 60 images, has its own seeded generator and PGD no
    random start), and the fast engine resolves them as the reference does."""
    monkeypatch.setattr(fastpurify.calibration, "CALIBRATION_IMAGES", 30)
    torch.manual_seed(0)
    net = small_cnn(num_classes=4, in_channels=1, width=4).double()
    x, y = synthetic_dataset(n=60, num_classes=4, channels=1, size=8, seed=1)
    kw = dict(adv_epochs=1, clean_epochs=1, pgd_steps=2, batch_size=16, lr=0.01, seed=5, progress=False,
              schedule=(0.2, 0.5))
    auto, auto_report = reference_pbe(net, (x.double(), y), **kw)
    chosen = auto_report.settings
    assert {"eps", "flip", "padding"} <= set(chosen["calibration"]) and chosen["calibration"]["images"] == 30
    explicit, _ = reference_pbe(net, (x.double(), y), eps=chosen["eps"], flip=chosen["flip"],
                                padding=chosen["padding"], **kw)
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), explicit.state_dict().values()))
    fast, fast_report = fastpurify.pbe(net, (x.double(), y), device="cpu", **kw)
    assert fast_report.settings["calibration"] == chosen["calibration"]
    gap = max(float((a - b).abs().max()) for a, b in zip(fast.state_dict().values(), auto.state_dict().values())
              if a.is_floating_point())
    assert gap < 1e-6  # the engine calibrates its own copy the same way, then follows the reference


@pytest.mark.parametrize("kw, message", [
    (dict(eps="big"), "eps must be a number"),
    (dict(flip="yes"), "flip must be True, False or 'auto'"),
    (dict(padding=-1), "padding must be a whole number"),
    (dict(padding=2.5), "padding must be a whole number"),
    (dict(padding=True), "padding must be a whole number"),
])
def test_bad_auto_settings_are_refused(kw, message):
    x, y = synthetic_dataset(n=20, num_classes=4, channels=1, size=8, seed=1)
    with pytest.raises(InputError, match=message):
        fastpurify.pbe(small_cnn(num_classes=4, in_channels=1, width=4), clean_data=(x, y), device="cpu",
                       progress=False, **kw)
