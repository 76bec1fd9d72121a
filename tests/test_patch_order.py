"""The trigger-guided pruning order (fastpurify.patch_order) and the auto rule walking it
(choose_pruning(order="patch")): on a model whose backdoor lives in one BatchNorm channel that
ANP's masks rank last. (Measured on real subjects in docs/anp-selection.md.)"""

import pytest
import torch
import torch.nn as nn

from fastpurify import InputError
from fastpurify.inference import predict
from fastpurify.patch_order import PatchOrder, patch_order
from fastpurify.pruning import prune
from fastpurify import selection as S

pytestmark = pytest.mark.usefixtures("torch_backend")


class _OneChannelBackdoor(nn.Module):
    """8x8 one-channel images through a 1x1 convolution into 4 BatchNorm channels that each copy
    the image. Class 3 scores 200 times channel 0's top-left pixel above 0.5 (the backdoor:
    pruning channel 0 leaves its shift, 0, so class 3 scores -100). The other classes match
    channel 1 against a +-1 template each (the clean task: the images are templates, below);
    channels 2 and 3 against unrelated templates (noise)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("templates", _templates(3))
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x):
        f = self.bn(self.conv(x)) - 0.25
        logits = 100 * torch.einsum("nkhw,kchw->nc", f[:, 1:], self.templates) / 64
        logits[:, 3] = 200 * (f[:, 0, 0, 0] + 0.25 - 0.5)
        return logits


def _templates(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (k, 10, 8, 8), generator=g).float() * 2 - 1


def _subject():
    model = _OneChannelBackdoor().eval()
    g = torch.Generator().manual_seed(0)
    classes = torch.tensor([c for c in range(10) if c != 3])
    wanted = classes[torch.randint(0, 9, (60,), generator=g)]
    images = 0.25 + 0.2 * model.templates[0, wanted] + 0.03 * torch.randn(60, 8, 8, generator=g)
    images = images.clamp(0, 0.49)[:, None]  # the corner below 0.5: class 3 never wins on clean images
    labels = predict(model, images)  # the clean task as the model does it: clean accuracy 1
    assert (labels == wanted).float().mean() > 0.9
    masks = {"bn": torch.tensor([0.9, 0.1, 0.2, 0.3])}  # ANP's ranking puts the backdoor channel last
    return model, masks, images, labels


def _corner(images):
    triggered = images.clone()
    triggered[:, 0, 0, 0] = 1.0
    return triggered


def test_the_order_puts_the_backdoor_channel_first_and_stops_when_no_patch_reaches_the_target():
    model, masks, images, labels = _subject()
    assert (predict(model, _corner(images)) == 3).all()  # the backdoor works
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = patch_order(model, masks, images, labels, 3, area=1 / 64, steps=40, refresh=1, batch_size=16)
    assert order.neurons == [("bn", 0)]
    assert order.acc == [1.0] and order.acc0 == 1.0
    assert order.shares[0] == (0, 1.0) and order.shares[-1][0] == 1 and order.shares[-1][1] <= 0.05
    assert "sends" in order.stopped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    ranking = order.ranking(masks)
    pruned = prune(model, ranking, number=1).eval()
    assert not (predict(pruned, _corner(images)) == 3).any()  # the backdoor is gone
    assert torch.equal(predict(pruned, images), labels)  # the clean task is not touched
    assert not (predict(prune(model, masks, number=3).eval(), images) == labels).all()  # ANP's order costs accuracy


def test_the_ranking_is_the_order_then_the_masks_own():
    masks = {"a": torch.tensor([0.5, 0.1, 0.7]), "b": torch.tensor([0.3, 0.05])}
    order = PatchOrder([("b", 0), ("a", 2)], [1.0, 1.0], [1.0, 2.0], 1.0, "test")
    ranking = order.ranking(masks)
    assert list(ranking) == ["a", "b"] and [v.dtype for v in ranking.values()] == [torch.float32] * 2
    flat = torch.cat(list(ranking.values()))
    assert flat.min() >= 0 and flat.max() < 1
    # b0, a2 first, then the masks' ascending order of the rest: b1 (0.05), a1 (0.1), a0 (0.5)
    assert torch.argsort(flat).tolist() == [3, 2, 4, 1, 0]
    assert order.as_dict()["neurons"] == [["b", 0], ["a", 2]]


def test_the_order_keeps_to_its_pool_and_its_accuracy_budget():
    model, masks, images, labels = _subject()
    # the pool: the masks' lowest neuron only (channel 1, the clean task's); no budget for any loss
    order = patch_order(model, masks, images, labels, 3, acc_budget=0.0, pool=1, area=1 / 64, steps=40,
                        batch_size=16)
    assert order.neurons == [] and "no further candidate" in order.stopped
    order = patch_order(model, masks, images, labels, 3, area=1 / 64, steps=40, refresh=100, max_neurons=2,
                        batch_size=16)
    assert order.neurons[0] == ("bn", 0) and len(order.neurons) <= 2
    assert all(a >= order.acc0 - order.settings["acc_budget"] for a in order.acc)


@pytest.mark.parametrize("kw, words", [
    (dict(target=-1), "target must be a class index"),
    (dict(acc_budget=1.5), "acc_budget"),
    (dict(refresh=0), "refresh"),
    (dict(pool=0), "pool"),
    (dict(area=0.0), "area"),
])
def test_bad_order_settings_are_refused(kw, words):
    model, masks, images, labels = _subject()
    target = kw.pop("target", 3)
    with pytest.raises(InputError, match=words):
        patch_order(model, masks, images, labels, target, steps=2, **kw)


def test_the_order_needs_images_of_other_classes():
    model, masks, images, _ = _subject()
    with pytest.raises(InputError, match="every clean image is of class 3"):
        patch_order(model, masks, images, torch.full((images.shape[0],), 3), 3, steps=2)


def test_the_auto_rule_walks_the_order_and_prunes_the_backdoor_channel(monkeypatch):
    model, masks, images, labels = _subject()
    # the clean task's random linear map is fragile to a per-image adversary: keep it from flipping any
    # image, so the patch scan names the target
    monkeypatch.setitem(S.DEFAULT_EPS, "inputs", 1e-6)
    kw = dict(steps=40, eps=1 / 64, candidates=2, max_fraction=0.5, batch_size=32)
    by_masks = S.choose_pruning(model, masks, images, labels, **kw)
    assert by_masks.settings["suspected_by"] == "patch scan"
    assert by_masks.target == 3 and by_masks.order is None and by_masks.ranking is masks
    by_order = S.choose_pruning(model, masks, images, labels, order="patch", **kw)
    assert by_order.target == 3 and by_order.settings["order"] == "patch"
    assert by_order.order.neurons[0] == ("bn", 0) and "ordered by a reconstructed trigger" in by_order.reason
    assert by_order.pruned >= 1
    cleaned = by_order.prune(model).eval()
    assert not (predict(cleaned, _corner(images)) == 3).any()
    assert by_order.as_dict()["order"]["neurons"][0] == ["bn", 0]
    # the masks' ranking reaches the backdoor channel only after the clean task's: it prunes nothing or breaks it
    if by_masks.pruned:
        assert (predict(by_masks.prune(model).eval(), _corner(images)) == 3).any() or \
            not torch.equal(predict(by_masks.prune(model).eval(), images), labels)


def test_the_order_needs_the_patch_probe():
    model, masks, images, labels = _subject()
    with pytest.raises(InputError, match="needs probe='patch'"):
        S.choose_pruning(model, masks, images, labels, probe="inputs", order="patch")
    with pytest.raises(InputError, match="order must be one of"):
        S.choose_pruning(model, masks, images, labels, order="rank")


def test_the_order_and_the_walk_can_use_a_larger_patch(monkeypatch):
    model, masks, images, labels = _subject()
    monkeypatch.setitem(S.DEFAULT_EPS, "inputs", 1e-6)
    chosen = S.choose_pruning(model, masks, images, labels, steps=40, eps=1 / 64, candidates=2, max_fraction=0.5,
                              batch_size=32, order="patch", order_area=2 / 64)
    assert chosen.settings["order_area"] == 2 / 64 and chosen.order.settings["area"] == 2 / 64
    assert "a reconstructed trigger of 0.03125 of the pixels" in chosen.reason
    assert chosen.order.neurons[0] == ("bn", 0) and chosen.pruned >= 1
    assert chosen.points[0].target_share == 1.0  # the walk's unpruned point, measured with the larger patch
    with pytest.raises(InputError, match="order_area"):
        S.choose_pruning(model, masks, images, labels, order="patch", order_area=0.0)


class _StubProbe:
    """A PruningProbe stand-in whose patch toward class c at area a sends ``shares[a][c]`` of the images."""

    def __init__(self, shares, classes=4):
        self.shares, self.classes, self.calls = shares, classes, []

    def num_classes(self):
        return self.classes

    def under(self, probe, *, eps, steps, target=None):
        stub = self

        class _Point:
            def point(self):
                stub.calls.append((eps, target))
                return S.SelectionPoint(0, 1.0, 0.0, (), None, 0.0, stub.shares[eps][target])
        return _Point()


def test_the_patch_area_climbs_while_no_other_class_is_reached():
    shares = {0.01: [1.0, 0.1, 0.0, 0.2], 0.02: [1.0, 0.3, 0.1, 0.39], 0.04: [1.0, 0.1, 0.5, 0.9],
              0.08: [1.0, 1.0, 1.0, 1.0]}
    probe = _StubProbe(shares)
    area, reading = S.read_patch_area(probe, 0, eps=0.01, steps=5, bar=0.4)
    assert area == 0.02  # 0.04 reaches class 2 (0.5 >= 0.4): the ladder ends there
    assert [r["area"] for r in reading] == [0.01, 0.02, 0.04]
    assert [r["max_other"] for r in reading] == [0.2, 0.39, 0.5] and reading[-1]["max_other_class"] == 2
    assert (0.04, 3) not in probe.calls and (0.08, 1) not in probe.calls  # stopped at the first class over the bar
    assert all(target != 0 for _, target in probe.calls)  # the suspected target's own patch is not a reading


def test_the_patch_area_reuses_the_scan_and_stays_within_the_image():
    shares = {0.3: [1.0, 0.0, 0.0], 0.6: [1.0, 0.1, 0.2]}
    probe = _StubProbe(shares, classes=3)
    area, reading = S.read_patch_area(probe, 0, eps=0.3, steps=5, bar=0.4, known=[1.0, 0.05, 0.0])
    assert area == 0.6 and [r["area"] for r in reading] == [0.3, 0.6]  # 1.2 of the pixels is not a patch
    assert reading[0]["max_other"] == 0.05  # the scan's shares at eps, not measured again
    assert all(eps == 0.6 for eps, _ in probe.calls)
    # another class reached at eps itself: the reading is eps
    area, reading = S.read_patch_area(_StubProbe({0.01: [1.0, 0.5, 0.0]}, classes=3), 0, eps=0.01, steps=5, bar=0.4)
    assert area == 0.01 and len(reading) == 1 and reading[0]["max_other_class"] == 1


class _SeededStubProbe(_StubProbe):
    """A stub whose shares depend on the reconstruction seed: ``by_seed[seed]`` is a ``shares`` table."""

    def __init__(self, by_seed, seed=0, classes=3, log=None):
        super().__init__(by_seed[seed], classes)
        self.by_seed, self.seed, self.log = by_seed, seed, [] if log is None else log
        self.log.append(seed)

    def reseeded(self, seed):
        return _SeededStubProbe(self.by_seed, seed, self.classes, self.log)


def _reads(area):
    """A seed's shares (target 0, classes 1-2) at which read_patch_area reads ``area`` (eps 0.01)."""
    ladder = (0.01, 0.02, 0.04, 0.08)
    return {a: [1.0, 0.1 if a <= area else 0.6, 0.0] for a in ladder}


def test_the_patch_area_is_the_median_of_several_seeds_readings():
    # seeds read 2, 1, 2 %: two of three agree at once, so the third reading decides nothing new
    probe = _SeededStubProbe({0: _reads(0.02), 1: _reads(0.01), 2: _reads(0.02), 3: _reads(0.08), 4: _reads(0.08)})
    area, votes = S.vote_patch_area(probe, 0, eps=0.01, steps=5, bar=0.4, readings=3)
    assert area == 0.02 and [v["area"] for v in votes] == [0.02, 0.01, 0.02] and probe.log == [0, 1, 2]
    assert [v["seed"] for v in votes] == [0, 1, 2] and votes[1]["reading"][-1]["max_other"] == 0.6
    # five readings: it stops at the third agreeing one (seed 3 here), never reading seed 4
    probe = _SeededStubProbe({0: _reads(0.02), 1: _reads(0.01), 2: _reads(0.02), 3: _reads(0.02), 4: _reads(0.01)})
    area, votes = S.vote_patch_area(probe, 0, eps=0.01, steps=5, bar=0.4, readings=5)
    assert area == 0.02 and len(votes) == 4 and probe.log == [0, 1, 2, 3]
    # no majority: the median of 1, 8, 2, 4, 8 % is 4 %; of four readings, the smaller middle one
    table = {0: _reads(0.01), 1: _reads(0.08), 2: _reads(0.02), 3: _reads(0.04), 4: _reads(0.08)}
    assert S.vote_patch_area(_SeededStubProbe(table), 0, eps=0.01, steps=5, bar=0.4, readings=5)[0] == 0.04
    assert S.vote_patch_area(_SeededStubProbe(table), 0, eps=0.01, steps=5, bar=0.4, readings=4)[0] == 0.02
    # one reading is read_patch_area's; the scan's shares serve the first seed only
    single = S.vote_patch_area(_SeededStubProbe(table), 0, eps=0.01, steps=5, bar=0.4, readings=1)
    assert single[0] == 0.01 and single[1][0]["reading"] == S.read_patch_area(_StubProbe(table[0], 3), 0, eps=0.01,
                                                                              steps=5, bar=0.4)[1]
    probe = _SeededStubProbe({0: _reads(0.02), 1: _reads(0.02), 2: _reads(0.01)})
    area, votes = S.vote_patch_area(probe, 0, eps=0.01, steps=5, bar=0.4, readings=3, known=[1.0, 0.9, 0.0])
    assert [v["area"] for v in votes] == [0.01, 0.02, 0.01] and area == 0.01  # seed 0 read the scan's 0.9
    assert votes[0]["reading"][0]["max_other"] == 0.9 and votes[1]["reading"][0]["max_other"] == 0.1
    with pytest.raises(InputError, match="area_readings"):
        S.vote_patch_area(probe, 0, eps=0.01, steps=5, bar=0.4, readings=0)


def test_the_order_reads_its_patch_size_from_the_model(monkeypatch):
    model, masks, images, labels = _subject()
    monkeypatch.setitem(S.DEFAULT_EPS, "inputs", 1e-6)
    chosen = S.choose_pruning(model, masks, images, labels, steps=40, eps=1 / 64, candidates=2, max_fraction=0.5,
                              batch_size=32, order="patch", order_area="auto")
    reading, area = chosen.settings["area_reading"], chosen.settings["order_area_read"]
    assert chosen.settings["order_area"] == "auto" and chosen.order.settings["area"] == area
    votes = chosen.settings["area_votes"]  # the default: the median of up to 5 reconstruction seeds' readings
    assert chosen.settings["area_readings"] == 5 and 3 <= len(votes) <= 5
    assert area == sorted(v["area"] for v in votes)[(len(votes) - 1) // 2]
    assert reading == next(v["reading"] for v in votes if v["area"] == area)
    below = [r for r in reading if r["max_other"] < 0.4]  # min_suspicion, the bar
    assert below and area == below[-1]["area"] and [r["area"] for r in reading][:len(below)] == [r["area"] for r in below]
    assert f"the patch size read from the model: {area:g} of the pixels" in chosen.reason
    assert chosen.order.neurons[0] == ("bn", 0)
    with pytest.raises(InputError, match="order_area must be a share of the pixels in \\(0, 1\\] or 'auto'"):
        S.choose_pruning(model, masks, images, labels, order="patch", order_area="large")
