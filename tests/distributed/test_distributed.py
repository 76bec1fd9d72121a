"""Data-parallel ANP, PBE and PGD under a gloo process group of 2-3 CPU processes equal one
process with the same global batch (float64), and the engines refuse worlds that do not fit the
data. Each test spawns fresh interpreters (a few seconds each); the helpers themselves are
tested in test_helpers.py."""

import json

import pytest
import torch

import fastpurify
from fastpurify import InputError
from fastpurify import distributed as D

from ..engines.subjects import clean_set, max_gap, token_net
from .harness import run_ranks
from .ranks import anp_masks, cli, pbe_run, pgd_run


@pytest.mark.parametrize("subject, kinds, world, batch", [("block", ("batchnorm",), 2, 8),
                                                          ("plain", ("conv_linear",), 3, 6)])
def test_data_parallel_anp_equals_one_process_with_the_same_global_batch(subject, kinds, world, batch):
    from tests.engines.subjects import block_net, plain_net

    answers = run_ranks(anp_masks, world, subject, kinds, batch, False)
    net = {"block": block_net, "plain": plain_net}[subject]()
    kw = dict(device="cpu", mask_layers=kinds, iterations=4, seed=2, progress=False)
    one = fastpurify.anp(net, clean_set(16), batch_size=batch, micro_batch=batch // world, **kw)
    for masks, loss, ranks in answers:
        assert ranks == world
        assert max_gap(masks, one.masks) < 1e-6
        assert torch.allclose(torch.tensor(loss), torch.tensor(one.loss), atol=1e-9)


def test_data_parallel_layer_norm_anp_equals_the_plain_one_process_run():
    answers = run_ranks(anp_masks, 2, "token", ("layernorm",), 8, False)
    one = fastpurify.anp(token_net(), clean_set(16), device="cpu", iterations=4, batch_size=8, seed=2,
                         progress=False)
    for masks, _, _ in answers:
        assert max_gap(masks, one.masks) < 1e-6


@pytest.mark.parametrize("subject, progressive", [("block", False), ("plain", True)])
def test_data_parallel_pbe_equals_one_process_with_the_same_micro_batches(subject, progressive):
    from tests.engines.subjects import block_net, plain_net

    answers = run_ranks(pbe_run, 2, subject, progressive, None)
    net = {"block": block_net, "plain": plain_net}[subject]()
    kw = dict(adv_epochs=1, clean_epochs=1, batch_size=8, eps=8 / 255, pgd_steps=2, progress=False, seed=1,
              device="cpu", micro_batch=4, random_start=True)
    if progressive:
        one, report = fastpurify.pbe(net, train_data=clean_set(20, seed=5), schedule=(0.4, 0.8), **kw)
    else:
        one, report = fastpurify.pbe(net, clean_data=clean_set(16), **kw)
    for state, ranking in answers:
        for k, v in one.state_dict().items():
            assert torch.allclose(state[k].double(), v.double(), atol=1e-6), k
        if progressive:
            assert torch.equal(ranking, report.ranking)


def test_sharded_pgd_equals_one_process():
    from tests.engines.subjects import block_net

    answers = run_ranks(pgd_run, 2)
    images, labels = clean_set(7)
    one = fastpurify.pgd(block_net().eval(), images, labels, steps=2, seed=3, batch_size=2)
    for adv in answers:
        assert torch.allclose(adv, one, atol=1e-12)


def test_world_larger_than_the_batch_is_refused(monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 3)
    with pytest.raises(InputError, match="the world size 3 is larger than the batch of 2 images"):
        fastpurify.anp(token_net(), clean_set(4), device="cpu", batch_size=2, iterations=1, progress=False)
    with pytest.raises(InputError, match="batch_size 8 must be divisible by the world size 3"):
        fastpurify.anp(token_net(), clean_set(4), device="cpu", batch_size=8, iterations=1, progress=False)
    with pytest.raises(InputError, match="batch_size 8 must be divisible by the world size 3"):
        fastpurify.pbe(token_net(), clean_data=clean_set(4), device="cpu", batch_size=8, progress=False)


def test_the_anp_command_on_two_ranks_writes_once(tmp_path, checkpoint):
    out = tmp_path / "anp"
    argv = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(out), "--iterations", "4",
            "--batch-size", "8", "--clean-images", "20", "--no-plot", "--no-progress", "--device", "cpu",
            "--mask-layers", "batchnorm", "--dist-timeout", "60"]
    assert run_ranks(cli, 2, argv) == [0, 0]
    report = json.loads((out / "report.json").read_text())
    assert report["engine_info"]["world_size"] == 2 and report["engine_info"]["micro_batch"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["mask_values.txt", "masks.json", "pruned_model.safetensors",
                                                      "report.json", "sweep.txt"]
