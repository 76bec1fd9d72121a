import pytest
import torch

from fastpurify import InputError
from fastpurify.arena import NeuronArena
from fastpurify.data import make_generator
from fastpurify.layers import convert
from fastpurify.models import small_cnn


def test_every_layer_reads_the_one_flat_arena():
    model = convert(small_cnn(num_classes=10, in_channels=3, width=4))
    arena = NeuronArena(model)
    sizes = [layer.num_features for layer in arena.layers.values()]
    assert arena.num_neurons == sum(sizes) and arena.noise.shape == (2, 2, sum(sizes))
    assert all("neuron_mask" not in dict(layer.named_parameters()) for layer in arena.layers.values())
    offset = 0
    for layer, c in zip(arena.layers.values(), sizes):
        assert layer.neuron_mask.data_ptr() == arena.mask[offset:].data_ptr() and layer.neuron_mask.requires_grad
        offset += c
    arena.draw_noise(0.4, make_generator(0))
    assert torch.equal(arena.noise[0], torch.zeros_like(arena.noise[0]))  # the clean group stays zero
    assert arena.perturbation.abs().max() <= 0.4 and arena.perturbation.is_contiguous()
    arena.set_mode("grouped")
    first = next(iter(arena.layers.values()))
    assert first.batch_groups == 2 and first.noise.shape == (2, sizes[0]) and torch.equal(first.noise[1], arena.noise[1, 0, :sizes[0]])
    arena.set_mode("perturbed")
    assert first.batch_groups == 1 and first.perturbed and first.noise_bias.shape == (sizes[0],)
    arena.set_mode("clean")
    assert not first.perturbed
    with torch.no_grad():
        arena.mask[:3] = 0.25
    masks = arena.masks()
    assert list(masks) == list(arena.layers) and masks[next(iter(masks))][:3].tolist() == [0.25] * 3


def test_unconverted_models_and_bad_modes_are_refused():
    with pytest.raises(InputError, match="convert it first"):
        NeuronArena(small_cnn(num_classes=10, in_channels=3, width=4))
    arena = NeuronArena(convert(small_cnn(num_classes=10, in_channels=3, width=4)))
    with pytest.raises(InputError, match="mode must be one of"):
        arena.set_mode("noisy")


def test_the_noise_is_one_draw_of_every_delta_then_every_xi(monkeypatch):
    """One uniform_ call per iteration (one launch on a GPU), the reference's documented draw: 2P
    values from the noise generator, the deltas first."""
    from fastpurify.ensemble import EnsembleArena

    model = convert(small_cnn(num_classes=10, in_channels=3, width=4))
    p = NeuronArena(model).num_neurons
    expected = torch.empty(2 * p).uniform_(-0.4, 0.4, generator=make_generator(3)).view(2, p)
    calls = []
    draw = torch.Tensor.uniform_

    def counted(self, *args, **kwargs):
        calls.append(self.shape)
        return draw(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "uniform_", counted)
    arena = NeuronArena(model)
    arena.draw_noise(0.4, make_generator(3))
    assert calls == [(2, p)] and torch.equal(arena.noise[1], expected)
    calls.clear()
    members = EnsembleArena(model, 3)
    members.draw_noise(0.4, [make_generator(3 + k) for k in range(3)])
    assert calls == [(2, p)] * 3 and torch.equal(members.noise[0], expected)
