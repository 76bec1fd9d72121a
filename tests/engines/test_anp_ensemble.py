"""Seed ensembles (``fastpurify.anp(seeds=K)``): member k is the single run with seed ``seed + k``
(float64), through every layer kind and both batch layouts; the aggregates; the refusals."""

import pytest
import torch
import torch.nn as nn

import fastpurify
from fastpurify import InputError
from fastpurify.ensemble import aggregate_masks
from fastpurify.models import small_cnn

from .subjects import block_net, clean_set, max_gap, plain_net, token_net


def _single_runs(model, data, seeds, **kw):
    return [fastpurify.anp(model, data, seed=s, **kw) for s in seeds]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return small_cnn(num_classes=10, in_channels=3, width=8).double()


@pytest.mark.parametrize("batched, grouped, steps", [(True, False, 1), (True, True, 1), (True, False, 2),
                                                     (True, True, 2), (None, None, 1)])
def test_member_k_is_the_single_run_with_seed_k(cnn, batched, grouped, steps):
    g = torch.Generator().manual_seed(1)
    data = torch.rand(40, 3, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    kw = dict(iterations=12, batch_size=8, steps=steps, grouped=grouped, progress=False, device="cpu")
    ensemble = fastpurify.anp(cnn, data, seeds=3, seed=5, batched=batched, **kw)
    singles = _single_runs(cnn, data, [5, 6, 7], **kw)
    assert len(ensemble.members) == 3 and ensemble.engine["members"] == 3
    assert ensemble.engine["batched"] is bool(batched)  # off CUDA the members run one after another by default
    for member, single, losses in zip(ensemble.members, singles, ensemble.member_loss):
        assert max_gap(member, single.masks) < 1e-6
        assert torch.allclose(torch.tensor(losses), torch.tensor(single.loss), atol=1e-9)
    # the members differ (their own draws), and the default aggregate is their mean mask
    assert max_gap(ensemble.members[0], ensemble.members[1]) > 1e-3
    mean = {k: sum(m[k] for m in ensemble.members) / 3 for k in ensemble.masks}
    assert max_gap(ensemble.masks, mean) < 1e-12
    assert ensemble.settings["seeds"] == 3 and ensemble.settings["aggregate"] == "mean"


class OwnForwardBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: the generic path."""

    def forward(self, x):
        return super().forward(x) * 1.0


NETS = {"groupnorm": (lambda: block_net(lambda c: nn.GroupNorm(2, c)), ("groupnorm",)),
        "layernorm": (token_net, ("layernorm",)),
        "generic": (lambda: block_net(OwnForwardBatchNorm), ("batchnorm",)),
        "conv_linear": (plain_net, ("conv_linear",))}


@pytest.mark.parametrize("net", list(NETS))
def test_every_layer_kind_serves_the_ensemble(net):
    build, kinds = NETS[net]
    model, data = build(), clean_set(16)
    kw = dict(iterations=6, batch_size=4, progress=False, device="cpu", mask_layers=kinds)
    ensemble = fastpurify.anp(model, data, seeds=2, grouped=True, batched=True, **kw)
    for member, single in zip(ensemble.members, _single_runs(model, data, [0, 1], **kw)):
        assert max_gap(member, single.masks) < 1e-6
    if net == "generic":
        assert "generic" in {layer.path for layer in _converted_layers(model)}


def _converted_layers(model):
    from fastpurify.layers import convert, perturbed_layers
    return perturbed_layers(convert(model)).values()


def test_rank_aggregate_is_the_mean_normalised_rank():
    members = [{"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([0.5])},
               {"a": torch.tensor([0.7, 0.2]), "b": torch.tensor([0.2])}]
    ranks = aggregate_masks(members, "rank")
    # member 0 ranks (0, 1, 0.5); member 1 ranks a0=1, a1=0.25 (tie 0.2 with b0), b0=0.25
    assert torch.allclose(ranks["a"], torch.tensor([0.5, 0.625])) and torch.allclose(ranks["b"], torch.tensor([0.375]))
    assert torch.allclose(aggregate_masks(members)["a"], torch.tensor([0.4, 0.55]))


def test_ensemble_refusals(cnn):
    data = clean_set(8, channels=3, size=8)
    data = (data[0].double(), torch.randint(0, 10, (8,)))
    kw = dict(iterations=1, batch_size=4, progress=False, device="cpu")
    for bad, words in [(dict(seeds=0), "seeds"), (dict(seeds=2, aggregate="median"), "aggregate"),
                       (dict(seeds=2, batched=True, aggregate="median"), "aggregate"),
                       (dict(seeds=2, batched=True, micro_batch=2), "micro_batch"),
                       (dict(seeds=2, batched=True, checkpoint=True), "checkpoint")]:
        with pytest.raises(InputError, match=words):
            fastpurify.anp(cnn, data, **kw, **bad)


def test_members_one_after_another_take_the_large_model_options(cnn):
    data = clean_set(16, channels=3, size=8)
    data = (data[0], torch.randint(0, 10, (16,)))
    kw = dict(iterations=3, batch_size=8, progress=False, device="cpu", micro_batch=4)
    ensemble = fastpurify.anp(cnn, data, seeds=2, **kw)
    for member, single in zip(ensemble.members, _single_runs(cnn, data, [0, 1], **kw)):
        assert max_gap(member, single.masks) == 0.0


def test_batched_ensemble_through_the_triton_kernels(cnn, monkeypatch):
    """The K batch groups of the noise steps and the 2K of the mask step, each member's mask in the
    noise rows, through the interpreted kernels (as on CUDA, where both are the defaults)."""
    monkeypatch.setenv("FASTPURIFY_BACKEND", "triton")
    g = torch.Generator().manual_seed(2)
    data = torch.rand(12, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (12,), generator=g)
    kw = dict(iterations=2, batch_size=4, steps=2, grouped=True, progress=False, device="cpu")
    ensemble = fastpurify.anp(cnn, data, seeds=2, batched=True, **kw)
    assert ensemble.engine["backend"] == "triton"
    for member, single in zip(ensemble.members, _single_runs(cnn, data, [0, 1], **kw)):
        assert max_gap(member, single.masks) < 1e-6
