"""``sample_into``: the batch ``sample()`` draws, written into an engine's buffers — bit for bit the
same values, the same draws (the generator ends in the same state), through the fused gather-and-
augment kernel (kernels/augment.py, on the interpreter here) and through PyTorch's ops."""

import pytest
import torch

from fastpurify.data import DeviceBatchSampler
from fastpurify.ensemble import MemberSamplers
from fastpurify.validation import InputError

from ..devices import TEST_DEVICE, on_device

CONFIGS = [dict(augment=True, padding=4, flip=True), dict(augment=True, padding=0, flip=True),
           dict(augment=True, padding=3, flip=False), dict(augment=False), dict(augment=True, padding=9, flip=True)]


def dataset(n=23, c=3, h=7, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return on_device(torch.rand(n, c, h, w, generator=g) + 0.1), on_device(torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("layout,dtype", [("nchw", torch.float32), ("nhwc", torch.float32), ("nchw", torch.float64)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sample_into_writes_the_sampled_batch(config, layout, dtype, backend, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_BACKEND", backend)
    import fastpurify.kernels.augment as kernel

    launches = []
    launcher = kernel.gather_augment
    monkeypatch.setattr(kernel, "gather_augment", lambda *a: launches.append(1) or launcher(*a))
    x, y = dataset()
    batch = 6
    a = DeviceBatchSampler(x, y, batch, seed=3, **config)
    b = DeviceBatchSampler(x, y, batch, seed=3, **config)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    images = torch.full((batch, *x.shape[1:]), -1.0, dtype=dtype, device=x.device).contiguous(memory_format=fmt)
    labels = torch.full((batch,), -1, dtype=torch.long, device=x.device)
    for _ in range(3):  # successive batches: the generators stay in step
        want_x, want_y = a.sample()
        b.sample_into(images, labels)
        assert torch.equal(images, want_x.to(dtype)) and torch.equal(labels, want_y)
        assert images.is_contiguous(memory_format=fmt)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert len(launches) == (3 if backend == "triton" else 0)  # one fused launch a batch, or none


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_shard_of_the_batch(backend, monkeypatch):
    """A rank's rows of the whole batch (the draws are the whole batch's, as every rank makes them)."""
    monkeypatch.setenv("FASTPURIFY_BACKEND", backend)
    x, y = dataset()
    a, b = (DeviceBatchSampler(x, y, 8, seed=1) for _ in range(2))
    images, labels = torch.empty(3, *x.shape[1:], device=x.device), torch.empty(3, dtype=torch.long, device=x.device)
    want_x, want_y = a.sample()
    b.sample_into(images, labels, slice(2, 5))
    assert torch.equal(images, want_x[2:5]) and torch.equal(labels, want_y[2:5])


def test_an_ensemble_writes_each_members_block():
    x, y = dataset()
    a, b = (MemberSamplers(x, y, 4, [5, 6, 7]) for _ in range(2))
    images, labels = torch.empty(12, *x.shape[1:], device=x.device), torch.empty(12, dtype=torch.long, device=x.device)
    want_x, want_y = a.sample()
    b.sample_into(images, labels)
    assert torch.equal(images, want_x) and torch.equal(labels, want_y)
    with pytest.raises(InputError, match="written whole"):
        b.sample_into(images, labels, slice(0, 4))


def test_a_buffer_of_the_wrong_shape_is_refused():
    x, y = dataset()
    sampler = DeviceBatchSampler(x, y, 8)
    state = sampler.generator.get_state()
    with pytest.raises(InputError, match=r"the batch buffer holds \(7, 3, 7, 5\)"):
        sampler.sample_into(torch.empty(7, 3, 7, 5, device=x.device), torch.empty(7, dtype=torch.long, device=x.device))
    assert torch.equal(sampler.generator.get_state(), state)  # refused before any draw


def test_padding_wider_than_the_image_gives_zeros_where_the_crop_leaves_it():
    """A crop window far off the image (padding 9 on 7x5) is zeros there, as torchvision's."""
    x, y = dataset(n=4)
    a, b = (DeviceBatchSampler(x, y, 4, seed=0, padding=9, flip=False) for _ in range(2))
    images, labels = torch.empty(4, 3, 7, 5, device=x.device), torch.empty(4, dtype=torch.long, device=x.device)
    want, _ = a.sample()
    b.sample_into(images, labels)
    assert torch.equal(images, want) and (images == 0).any() and (images > 0).any()
    assert TEST_DEVICE == images.device or TEST_DEVICE.type == images.device.type
