import pytest
import torch
import torch.nn as nn

from fastpurify import InputError
from fastpurify.backdoor import BadNets, evaluate
from fastpurify.models import small_cnn
from fastpurify.pruning import (DEFAULT_THRESHOLDS, count_pruned, format_sweep, prune, prune_by_clean_accuracy,
                              select_neurons, sweep)


def _model_and_masks():
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, in_channels=1, width=4)
    for m in model.modules():  # non-trivial BN parameters and statistics
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.1, 0.1)
    g = torch.Generator().manual_seed(3)
    masks = {name: torch.rand(m.num_features, generator=g) for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d)}
    return model, masks


def test_pruning_zeroes_gamma_keeps_beta_and_leaves_the_model_alone():
    model, masks = _model_and_masks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, masks, threshold=0.4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the given model changed: {k}"
    state = pruned.state_dict()
    n_zeroed = 0
    for k, v in state.items():
        layer, _, param = k.rpartition(".")
        if layer in masks and param == "weight":
            chosen = masks[layer] <= 0.4
            assert torch.all(v[chosen] == 0) and torch.equal(v[~chosen], before[k][~chosen])
            n_zeroed += int(chosen.sum())
        else:  # beta, running statistics, convolutions and the classifier are untouched
            assert torch.equal(v, before[k]), k
    assert n_zeroed == sum(int((m <= 0.4).sum()) for m in masks.values()) > 0


def test_ranking_is_global_across_layers_stable_and_inclusive():
    masks = {"a": torch.tensor([0.5, 0.1, 0.3]), "b": torch.tensor([0.2, 0.3, 0.9]), "c": torch.tensor([0.05])}
    sel = select_neurons(masks, number=3)  # 0.05 (c), 0.1 (a), 0.2 (b)
    assert sel["a"].tolist() == [False, True, False] and sel["b"].tolist() == [True, False, False]
    assert sel["c"].tolist() == [True]
    sel = select_neurons(masks, number=4)  # a tie at 0.3: layer order decides (a before b), as the stable sort
    assert sel["a"].tolist() == [False, True, True] and sel["b"].tolist() == [True, False, False]
    sel = select_neurons(masks, threshold=0.3)  # mask <= t, as the official comparison
    assert sel["a"].tolist() == [False, True, True] and sel["b"].tolist() == [True, True, False]
    assert count_pruned(masks, fraction=0.5) == 3 and count_pruned(masks, fraction=1.0) == 7
    assert count_pruned(masks, threshold=0.0) == 0 and count_pruned(masks, number=0) == 0


def test_number_and_threshold_give_the_same_model_for_the_same_prefix():
    model, masks = _model_and_masks()
    k = count_pruned(masks, threshold=0.5)
    a, b = prune(model, masks, threshold=0.5), prune(model, masks, number=k)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("rule, message", [
    ({"threshold": 1.5}, r"threshold must lie in \[0, 1\]"),
    ({"threshold": -0.1}, r"threshold must lie in \[0, 1\]"),
    ({"number": 8}, r"number must be an integer in \[0, 7\]"),
    ({"number": -1}, r"number must be an integer"),
    ({"number": 2.0}, r"number must be an integer"),
    ({"fraction": 2}, r"fraction must lie in \[0, 1\]"),
    ({}, "exactly one of threshold, number or fraction"),
    ({"threshold": 0.2, "number": 1}, "exactly one of threshold, number or fraction"),
])
def test_bad_rules_are_refused(rule, message):
    masks = {"a": torch.rand(3), "b": torch.rand(4)}
    with pytest.raises(InputError, match=message):
        select_neurons(masks, **rule)


def test_masks_must_fit_the_model():
    model, masks = _model_and_masks()
    with pytest.raises(InputError, match="not a BatchNorm, LayerNorm, GroupNorm, Conv or Linear layer with a weight"):
        prune(model, {"features.2": torch.rand(4)}, number=1)
    with pytest.raises(InputError, match="has 4 neurons but its masks hold 3"):
        prune(model, {"features.1": torch.rand(3)}, number=1)


def test_layer_norm_and_conv_neurons_are_pruned_by_their_weight_rows():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    masks = {"0": torch.tensor([0.9, 0.1, 0.8]), "3": torch.tensor([0.5, 0.05, 0.7, 0.95, 0.6])}
    pruned = prune(model, masks, number=2)
    assert torch.equal(pruned[0].weight[1], torch.zeros_like(pruned[0].weight[1]))  # the conv's output channel 1
    assert torch.equal(pruned[0].bias, model[0].bias)  # the bias is kept
    assert pruned[3].weight[1] == 0 and torch.equal(pruned[3].weight[[0, 2, 3, 4]], model[3].weight[[0, 2, 3, 4]])
    assert torch.equal(pruned[0].weight[[0, 2]], model[0].weight[[0, 2]])


def test_sweep_matches_separate_evaluations_and_prints_the_official_table():
    model, masks = _model_and_masks()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    attack = BadNets(num_classes=10, target=0)
    points = sweep(model, masks, images, labels, attack=attack, numbers=[0, 3, 7])
    assert [p.pruned for p in points] == [0, 0, 3, 7] and points[0].by is None
    for p in points:
        expected = evaluate(prune(model, masks, number=p.pruned), images, labels, attack)
        assert p.acc == pytest.approx(expected["acc"]) and p.asr == pytest.approx(expected["asr"])
    name, idx, value = points[2].last
    assert float(masks[name][idx]) == value == sorted(torch.cat(list(masks.values())).tolist())[2]
    table = format_sweep(points)
    assert table.splitlines()[0] == ("No. \t Layer Name \t Neuron Idx \t Mask \t PoisonLoss \t PoisonACC \t "
                                     "CleanLoss \t CleanACC")
    assert table.splitlines()[1].startswith("0 \t None \t None \t None \t ")
    assert len(sweep(model, masks, images, labels)) == 1 + len(DEFAULT_THRESHOLDS)
    with pytest.raises(InputError, match="not both"):
        sweep(model, masks, images, labels, thresholds=[0.1], numbers=[1])


class _ClassPerChannel(nn.Module):
    """Two identity BatchNorm1d layers (eval mode) whose channel c carries the logit of class c:
    pruning channel c in either layer makes every image of class c wrong."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)))


def test_clean_accuracy_rule_takes_the_largest_pruning_within_the_drop():
    labels = torch.tensor([0] + [1] + [2] * 10 + [3] * 8)  # 20 images
    images = torch.full((20, 1, 1, 4), 0.1)
    images[torch.arange(20), 0, 0, labels] = 1.0
    model = _ClassPerChannel()
    # Ascending: a0 (class 0, ACC 0.95), b1 (class 1, 0.90), then ties at 0.9: a1 (class 1 again: 0.90),
    # a2 (class 2: 0.40), ...
    masks = {"a": torch.tensor([0.1, 0.9, 0.9, 0.9]), "b": torch.tensor([0.9, 0.2, 0.9, 0.9])}
    choice = prune_by_clean_accuracy(model, masks, images, labels, max_drop=0.1, numbers=list(range(9)))
    assert choice.baseline.acc == 1.0 and choice.point.pruned == 3 and choice.point.acc == pytest.approx(0.9)
    assert choice.model.a.weight.tolist() == [0, 0, 1, 1] and choice.model.b.weight.tolist() == [1, 0, 1, 1]
    choice = prune_by_clean_accuracy(model, masks, images, labels, max_drop=0.1)  # official thresholds
    assert choice.point.pruned == 2 and choice.point.value == 0.2
    choice = prune_by_clean_accuracy(model, masks, images, labels, max_drop=0.05)
    assert choice.point.pruned == 1 and choice.point.value == 0.1
    choice = prune_by_clean_accuracy(model, masks, images, labels, max_drop=0.0)
    assert choice.point is choice.baseline and choice.model is not model
    assert choice.model.a.weight.tolist() == [1, 1, 1, 1]
    with pytest.raises(InputError, match=r"max_drop must lie in \[0, 1\]"):
        prune_by_clean_accuracy(model, masks, images, labels, max_drop=-0.1)
