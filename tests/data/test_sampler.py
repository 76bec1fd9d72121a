import pytest
import torch

from fastpurify.data import DeviceBatchSampler, augment_batch, make_generator
from fastpurify.validation import InputError


def coded_images(n, c=2, h=6, w=7):
    """Strictly positive images whose every pixel value is unique, so a crop is recognisable."""
    return (torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w) + 1) / (n * c * h * w + 1)


def recover(orig, out, padding):
    """The (row offset, column offset, flipped) that turns ``orig`` into ``out``."""
    h, w = orig.shape[-2:]
    padded = torch.nn.functional.pad(orig, (padding,) * 4)
    for flipped in (False, True):
        for r in range(2 * padding + 1):
            for c in range(2 * padding + 1):
                crop = padded[:, r:r + h, c:c + w]
                if torch.equal(crop.flip(-1) if flipped else crop, out):
                    return r, c, flipped
    raise AssertionError("output is not a padded crop of the input")


def test_each_output_is_a_padded_crop_with_optional_flip():
    x = coded_images(64)
    out = augment_batch(x, make_generator(0), padding=2)
    params = [recover(x[i], out[i], 2) for i in range(64)]
    assert len(set(params)) > 20  # draws differ between images


def test_crop_offsets_are_uniform():
    """Zero-padded rows/columns visible in a crop number |offset - p|: 0 once, 1..p twice each
    among the 2p + 1 equally likely offsets, independently for rows and columns."""
    n, p = 4000, 4
    x = torch.rand(n, 1, 12, 12) * 0.5 + 0.5  # strictly positive: zero padding is visible
    out = augment_batch(x, make_generator(123), padding=p)
    zero_rows = (out == 0).all(-1).squeeze(1).sum(-1)
    zero_cols = (out == 0).all(-2).squeeze(1).sum(-1)
    expected = torch.tensor([1, 2, 2, 2, 2]) / 9
    for counts in (zero_rows, zero_cols):
        hist = torch.bincount(counts, minlength=p + 1).float() / n
        assert hist.shape == (p + 1,) and torch.allclose(hist, expected, atol=0.03)
    # Zeros on the top side exactly when the row offset is below p: probability 4/9.
    assert 0.40 < (out[:, 0, 0, :] == 0).all(-1).float().mean() < 0.49
    assert abs(torch.corrcoef(torch.stack([zero_rows, zero_cols]).float())[0, 1]) < 0.05


def test_flip_rate_is_one_half():
    x = torch.zeros(2000, 1, 1, 2)
    x[..., 1] = 1.0  # the right pixel is bright: after a flip it is on the left
    out = augment_batch(x, make_generator(5), padding=0)
    flipped = out[:, 0, 0, 0] == 1.0
    assert 0.46 < flipped.float().mean() < 0.54


def test_no_augmentation_is_identity():
    x = coded_images(5)
    assert torch.equal(augment_batch(x, make_generator(0), padding=0, flip=False), x)


def test_seeded_reproducibility():
    x, y = coded_images(30), torch.arange(30) % 3
    a = DeviceBatchSampler(x, y, 8, seed=7)
    b = DeviceBatchSampler(x, y, 8, seed=7)
    c = DeviceBatchSampler(x, y, 8, seed=8)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a.sample(), b.sample(), c.sample()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


def test_draw_order_contract():
    """sample() = randint indices, then crop offsets, then flips, all from one generator."""
    x, y = coded_images(20), torch.arange(20)
    sampler = DeviceBatchSampler(x, y, 5, seed=11, padding=2)
    got_x, got_y = sampler.sample()
    g = make_generator(11)
    index = torch.randint(20, (5,), generator=g)
    expected = augment_batch(x[index], g, padding=2)
    assert torch.equal(got_y, index) and torch.equal(got_x, expected)


def test_epoch_covers_every_image_once():
    x, y = coded_images(23), torch.arange(23)
    sampler = DeviceBatchSampler(x, y, 5, augment=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5 and batches[-1][0].shape[0] == 3
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(23))
    for bx, by in batches:
        assert torch.equal(bx, x[by])
    dropped = DeviceBatchSampler(x, y, 5, augment=False, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 4


def test_with_replacement_draws_repeat():
    x, y = coded_images(10), torch.arange(10)
    _, idx = DeviceBatchSampler(x, y, 64, augment=False).sample()
    assert idx.unique().numel() < 64 and idx.min() >= 0 and idx.max() < 10


def test_bad_arguments():
    x, y = coded_images(4), torch.arange(4)
    with pytest.raises(InputError, match="batch_size"):
        DeviceBatchSampler(x, y, 0)
    with pytest.raises(InputError, match="padding"):
        DeviceBatchSampler(x, y, 2, padding=-1)
    with pytest.raises(InputError, match="one label per image"):
        DeviceBatchSampler(x, y[:3], 2)


@pytest.mark.gpu
def test_cuda_resident_and_same_contract():
    x, y = coded_images(20).cuda(), torch.arange(20).cuda()
    sampler = DeviceBatchSampler(x, y, 6, seed=3)
    bx, by = sampler.sample()
    assert bx.is_cuda and by.is_cuda
    g = make_generator(3, "cuda")
    index = torch.randint(20, (6,), generator=g, device="cuda")
    assert torch.equal(by, index) and torch.equal(bx, augment_batch(x[index], g))
    with pytest.raises(InputError, match="generator"):
        DeviceBatchSampler(x, y, 2, generator=make_generator(0, "cpu"))


def test_augmented_batches_have_default_nchw_strides():
    """Even with one channel (where indexing leaves NHWC strides that change the convolution
    algorithm, and with it the bits of the result), so every engine sees the same layout."""
    for channels in (1, 3):
        sampler = DeviceBatchSampler(torch.rand(10, channels, 8, 8), torch.zeros(10, dtype=torch.long), 4, padding=2)
        x, _ = sampler.sample()
        assert x.stride() == torch.empty(x.shape).stride()
