"""The BatchNorm statistics corrected for a pruning (fastpurify.bn_statistics), against a float64
computation by hand, and the auto rule's check that keeps or refuses the correction."""

import copy

import pytest
import torch
import torch.nn as nn

from fastpurify import InputError
from fastpurify import selection as S
from fastpurify.bn_statistics import batch_norms, clean_statistics, corrected_statistics, load_statistics
from fastpurify.pruning import prune

from .stubs import pruning_subject

pytestmark = pytest.mark.usefixtures("torch_backend")


def _net():
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear in float64, with stored statistics unlike the data's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    for bn in (net[1], net[4]):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
    images = torch.rand(30, 3, 7, 7, generator=g, dtype=torch.float64)
    return net.eval(), images


def _second_input_stats(net, images):
    """By hand: the second BatchNorm's input over all images, the first normalising with the batch's
    own (biased) statistics; its mean and unbiased variance per channel."""
    x = net[0](images)
    bn = net[1]
    x = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    x = net[3](torch.relu(x * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]))
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)


def test_the_correction_moves_the_stored_statistics_by_what_the_pruning_changed():
    net, images = _net()
    before = copy.deepcopy(net.state_dict())
    masks = {"1": torch.tensor([0.9, 0.1, 0.8, 0.7, 0.6]), "4": torch.tensor([0.5, 0.95, 0.2, 0.9])}
    pruned = prune(net, masks, number=2)  # channel 1 of the first BatchNorm, channel 2 of the second
    stats = corrected_statistics(net, pruned, images, batch_size=64)
    assert set(stats) == {"1", "4"}
    # the first BatchNorm's input does not depend on any pruning: its statistics stay as stored
    assert torch.allclose(stats["1"][0], net[1].running_mean, atol=1e-12, rtol=0)
    assert torch.allclose(stats["1"][1], net[1].running_var, atol=1e-12, rtol=0)
    mean0, var0 = _second_input_stats(net, images)
    mean1, var1 = _second_input_stats(pruned, images)
    assert not torch.allclose(mean0, mean1)  # the pruning moved the second BatchNorm's input
    eps = net[4].eps
    assert torch.allclose(stats["4"][0], net[4].running_mean + mean1 - mean0, atol=1e-10, rtol=0)
    assert torch.allclose(stats["4"][1], net[4].running_var * (var1 + eps) / (var0 + eps), atol=1e-10, rtol=1e-10)
    # neither model changed; load_statistics writes into the copy it is given
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(pruned[4].running_mean, net[4].running_mean)
    out = load_statistics(pruned, stats)
    assert out is pruned and torch.equal(pruned[4].running_mean, stats["4"][0])


def test_with_nothing_pruned_the_correction_is_exactly_none():
    net, images = _net()
    for batch_size in (7, 64):
        stats = corrected_statistics(net, copy.deepcopy(net), images, batch_size=batch_size)
        for name, bn in batch_norms(net).items():
            assert torch.equal(stats[name][0], bn.running_mean) and torch.equal(stats[name][1], bn.running_var)


def test_clean_statistics_are_the_cumulative_average_of_the_batches():
    net, images = _net()
    whole = clean_statistics(net, images, batch_size=30)["1"]
    halves = clean_statistics(net, images, batch_size=15)["1"]  # two equal batches: the means average exactly
    x = net[0](images)
    assert torch.allclose(whole[0], x.mean((0, 2, 3)), atol=1e-12, rtol=0)
    assert torch.allclose(whole[1], x.var((0, 2, 3), unbiased=True), atol=1e-12, rtol=0)
    assert torch.allclose(halves[0], whole[0], atol=1e-12, rtol=0)
    # and the net's own statistics and mode are as they were
    assert not net.training and not net[1].training and net[1].momentum == 0.1


def test_bad_inputs_are_refused():
    net, images = _net()
    with pytest.raises(InputError, match="no BatchNorm layer with running statistics"):
        clean_statistics(nn.Sequential(nn.Flatten(), nn.LayerNorm(147)), images)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        clean_statistics(net, images, batch_size=0)
    stats = corrected_statistics(net, copy.deepcopy(net), images)
    with pytest.raises(InputError, match="BatchNorm layers this model does not have"):
        load_statistics(nn.Sequential(nn.BatchNorm2d(5)), {"9": stats["1"]})
    with pytest.raises(InputError, match="hold 4 channels, the layer has 5"):
        load_statistics(copy.deepcopy(net), {"1": stats["4"]})
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).double()
    with pytest.raises(InputError, match="not the unpruned model's"):
        corrected_statistics(net, other, images)


_subject = pruning_subject


def _scripted(monkeypatch, walk_share, corrected_share, corrected_acc):
    """The patch walk: the pull names class 2, the patch sends ``walk_share(k)`` there at clean
    accuracy 0.9; on the model whose statistics were corrected it sends ``corrected_share`` at
    ``corrected_acc``."""
    def point(self):
        corrected = getattr(self.net, "_corrected", False)
        if self.probe == "patch":
            sent = corrected_share if corrected else walk_share(self.pruned)
            hist = [0] * 10
            hist[self.target] = round(100 * sent)
            return S.SelectionPoint(self.pruned, corrected_acc if corrected else 0.9, sent, tuple(hist), self.target,
                                    1.0, sent)
        hist = [0, 0, 80] + [20 // 7] * 7
        return S.SelectionPoint(self.pruned, 0.9, 1.0, tuple(hist), 2, 0.8)
    real_load = S.load_statistics

    def load(model, statistics):
        model._corrected = True
        return real_load(model, statistics)
    monkeypatch.setattr(S.PruningProbe, "point", point)
    monkeypatch.setattr(S, "load_statistics", load)


@pytest.mark.parametrize("corrected_share, corrected_acc, kept", [(0.02, 0.95, True), (0.2, 0.95, False),
                                                                   (0.02, 0.85, False)])
def test_the_auto_rule_keeps_the_correction_only_where_its_probe_still_passes(monkeypatch, corrected_share,
                                                                             corrected_acc, kept):
    _scripted(monkeypatch, lambda k: 1.0 if k < 4 else 0.0, corrected_share, corrected_acc)
    model, masks, images, labels = _subject()
    plain = S.choose_pruning(model, masks, images, labels, candidates=24)
    choice = S.choose_pruning(model, masks, images, labels, candidates=24, correct_statistics=True)
    assert plain.pruned == choice.pruned == 5 and plain.statistics is None  # ceil(4 * 1.25)
    assert choice.settings["correct_statistics"] and choice.statistics_check.pruned == 5
    assert choice.statistics_check.target_share == corrected_share
    assert choice.as_dict()["statistics"] == ("corrected" if kept else "stored")
    assert (choice.statistics is not None) == kept
    assert choice.reason.startswith(plain.reason)
    assert ("the BatchNorm statistics corrected for the pruning" in choice.reason) == kept
    net = choice.prune(model)
    reference = prune(model, choice.ranking, number=5)
    for name, bn in batch_norms(net).items():
        expected = choice.statistics[name] if kept else (reference.get_submodule(name).running_mean,
                                                         reference.get_submodule(name).running_var)
        assert torch.equal(bn.running_mean, expected[0]) and torch.equal(bn.running_var, expected[1])
        assert torch.equal(bn.weight, reference.get_submodule(name).weight)


def test_the_auto_rule_refuses_the_correction_without_batch_norms():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"2": torch.rand(6)}
    with pytest.raises(InputError, match="no BatchNorm layer that keeps them"):
        S.choose_pruning(model, masks, torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,)), correct_statistics=True)
