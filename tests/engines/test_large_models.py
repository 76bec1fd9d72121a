"""Large-model options of the engines: Conv/Linear (Eq. 3) and LayerNorm neurons against the
reference, micro-batches (exact without batch statistics), activation checkpointing, peak memory,
and their bad input. Float64 on CPU, PyTorch path unless a test asks for the kernels."""

import pytest
import torch
import torch.nn as nn

import fastpurify
from fastpurify import InputError
from fastpurify.engines.checkpointing import checkpoint_blocks
from fastpurify.reference import anp as reference_anp
from fastpurify.reference import pbe as reference_pbe

from .subjects import block_net, clean_set, max_gap, plain_net, token_net


ANP = dict(iterations=6, batch_size=8, progress=False, seed=2)


def test_conv_linear_neurons_equal_the_reference():
    net, data = plain_net(), clean_set()
    ref = reference_anp(net, data, mask_layers=("conv_linear",), **ANP)
    fast = fastpurify.anp(net, data, device="cpu", mask_layers="conv_linear", **ANP)
    assert list(fast.masks) == ["0", "2", "5"]  # the classifier (7) is left out
    assert max_gap(ref.masks, fast.masks) < 1e-9
    assert max_gap(fast.masks, {k: torch.ones_like(v) for k, v in fast.masks.items()}) > 1e-3
    assert fast.settings == ref.settings and fast.settings["mask_layers"] == ["conv_linear"]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_layer_norm_neurons_equal_the_reference(backend_name, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_BACKEND", backend_name)
    net, data = token_net(), clean_set(16)
    kw = dict(ANP, iterations=3 if backend_name == "triton" else 6)
    ref = reference_anp(net, data, **kw)
    fast = fastpurify.anp(net, data, device="cpu", **kw)
    assert list(fast.masks) == ["blocks.0.0", "blocks.1.0", "norm"]
    assert max_gap(ref.masks, fast.masks) < 1e-6


def test_selecting_kinds_masks_both_norms_or_one():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5), nn.LayerNorm(5),
                        nn.Linear(5, 4)).double()
    data = clean_set(size=5)
    kw = dict(ANP, iterations=2)
    assert list(fastpurify.anp(net, data, device="cpu", **kw).masks) == ["1", "4"]
    assert list(fastpurify.anp(net, data, device="cpu", mask_layers=["layernorm"], **kw).masks) == ["4"]
    both = fastpurify.anp(net, data, device="cpu", mask_layers="batchnorm,conv_linear", **kw)
    assert list(both.masks) == ["0", "1", "3"]


@pytest.mark.parametrize("make, kinds", [(plain_net, ("conv_linear",)), (token_net, ("layernorm",))])
def test_micro_batches_are_exact_without_batch_statistics(make, kinds):
    net, data = make(), clean_set(16)
    whole = fastpurify.anp(net, data, device="cpu", mask_layers=kinds, **ANP)
    for micro in (4, 1):
        split = fastpurify.anp(net, data, device="cpu", mask_layers=kinds, micro_batch=micro, **ANP)
        assert max_gap(whole.masks, split.masks) < 1e-9
        assert split.engine["micro_batch"] == micro
        assert torch.allclose(torch.tensor(split.loss), torch.tensor(whole.loss), atol=1e-12)


def test_micro_batches_normalise_batchnorm_per_micro_batch():
    net, data = block_net(), clean_set(16)
    whole = fastpurify.anp(net, data, device="cpu", **ANP)
    split = fastpurify.anp(net, data, device="cpu", micro_batch=4, **ANP)
    assert split.engine["micro_batch"] == 4
    assert 1e-6 < max_gap(whole.masks, split.masks) < 0.5  # the declared approximation: close, not equal
    assert fastpurify.anp(net, data, device="cpu", micro_batch="auto", **ANP).engine["micro_batch"] == 8  # CPU


def test_checkpointing_changes_nothing_but_memory():
    net, data = block_net(), clean_set(16)
    plain = fastpurify.anp(net, data, device="cpu", **ANP)
    ckpt = fastpurify.anp(net, data, device="cpu", checkpoint=True, **ANP)
    assert ckpt.engine["checkpointed_blocks"] == 2 and plain.engine["checkpointed_blocks"] == 0
    assert max_gap(plain.masks, ckpt.masks) < 1e-12
    # both ways of running the mask step's two passes: separately (the CPU default; each pass's
    # gradient taken in its own mode, which the recompute sees) and as one two-group batch
    assert not ckpt.engine["grouped"]
    grouped = fastpurify.anp(net, data, device="cpu", checkpoint=True, grouped=True, **ANP)
    assert grouped.engine["grouped"] and max_gap(plain.masks, grouped.masks) < 1e-12
    assert ckpt.engine["peak_memory_bytes"] > 0 and ckpt.engine["peak_memory_kind"] == "process peak RSS"
    with pytest.warns(UserWarning, match="no blocks to checkpoint"):
        fastpurify.anp(plain_net(), data, device="cpu", mask_layers="conv_linear", checkpoint=True,
                       **dict(ANP, iterations=1))


def test_checkpointed_blocks_keep_their_names_and_running_statistics():
    net = block_net()
    twin = block_net()
    assert checkpoint_blocks(twin) == ["1.0", "1.1"]
    assert [n for n, _ in twin.named_modules()] == [n for n, _ in net.named_modules()]
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    for model in (net, twin):
        model.train()
        model(x).sum().backward()  # the recompute in backward must not move the running statistics again
    for a, b in zip(net.buffers(), twin.buffers()):
        assert torch.equal(a, b)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


PBE = dict(adv_epochs=1, clean_epochs=1, batch_size=8, eps=8 / 255, pgd_steps=2, progress=False, seed=1)


def test_pbe_micro_batches_are_exact_without_batch_statistics():
    net, data = plain_net(), clean_set(16)
    whole, _ = fastpurify.pbe(net, clean_data=data, device="cpu", **PBE)
    split, report = fastpurify.pbe(net, clean_data=data, device="cpu", micro_batch=2, **PBE)
    assert report.engine["micro_batch"] == 2
    for a, b in zip(whole.state_dict().values(), split.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-10)


def test_pbe_micro_batches_average_the_running_statistics():
    net, data = block_net(), clean_set(16)
    ref, _ = reference_pbe(net, clean_data=data, **PBE)
    same, _ = fastpurify.pbe(net, clean_data=data, device="cpu", micro_batch=8, **PBE)  # one micro-batch: unchanged
    split, _ = fastpurify.pbe(net, clean_data=data, device="cpu", micro_batch=4, **PBE)
    for (k, a), b, c in zip(ref.state_dict().items(), same.state_dict().values(), split.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-9), k
        if k.endswith("num_batches_tracked"):
            assert torch.equal(a, c)  # one step per batch, however it is split
        else:
            assert torch.allclose(a.double(), c.double(), atol=0.2), k  # close: statistics per micro-batch


def test_pbe_checkpointing_returns_a_plain_model():
    net, data = block_net(), clean_set(16)
    plain, _ = fastpurify.pbe(net, clean_data=data, device="cpu", **PBE)
    ckpt, report = fastpurify.pbe(net, clean_data=data, device="cpu", checkpoint=True, **PBE)
    assert report.engine["checkpointed_blocks"] == 2 and "peak_memory_bytes" in report.engine
    assert not any("forward" in m.__dict__ for m in ckpt.modules())
    for a, b in zip(plain.state_dict().values(), ckpt.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-10)


@pytest.mark.parametrize("kw, message", [
    (dict(micro_batch=3), r"micro_batch 3 must divide the batch of 8 into equal micro-batches; divisors of 8: 1, 2, "
                          r"4, 8"),
    (dict(micro_batch=0), "micro_batch must be a positive integer, 'auto' or None"),
    (dict(micro_batch=16), "must divide the batch of 8"),
    (dict(mask_layers=("instancenorm",)), "mask_layers must name one or more of batchnorm, layernorm, groupnorm, "
                                          "conv_linear"),
    (dict(mask_layers=("groupnorm",)), r"no layer to mask among groupnorm.*present in this model: batchnorm, "
                                       r"conv_linear"),
])
def test_bad_large_model_options_are_refused(kw, message):
    with pytest.raises(InputError, match=message):
        fastpurify.anp(block_net(), clean_set(), device="cpu", **dict(ANP, **kw))


def test_bad_pbe_micro_batch_is_refused():
    with pytest.raises(InputError, match="micro_batch 3 must divide the batch of 8"):
        fastpurify.pbe(block_net(), clean_data=clean_set(), device="cpu", micro_batch=3, **PBE)
