import pytest
import torch

from fastpurify.data import load_digits, load_source, synthetic_dataset, train_test_split
from fastpurify.validation import InputError


def test_digits_are_the_real_scans():
    x, y = load_digits(size=8)
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The first scan is a zero: its centre column is dark between bright strokes.
    assert y[0] == 0 and x[0, 0, 3:5, 3:5].mean() < x[0, 0, 3:5, 1:3].mean()


def test_digits_upscaled_rgb():
    x, _ = load_digits(size=24, channels=3)
    assert x.shape == (1797, 3, 24, 24)
    assert torch.equal(x[:, 0], x[:, 2])
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(InputError, match="size"):
        load_digits(size=4)
    with pytest.raises(InputError, match="channels"):
        load_digits(channels=2)


def test_synthetic_is_seeded_and_balanced():
    a = synthetic_dataset(n=40, num_classes=4, channels=2, size=9, seed=3)
    b = synthetic_dataset(n=40, num_classes=4, channels=2, size=9, seed=3)
    c = synthetic_dataset(n=40, num_classes=4, channels=2, size=9, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (40, 2, 9, 9) and torch.bincount(a[1]).tolist() == [10] * 4
    # Learnable: images are nearer their own class mean than another's.
    means = torch.stack([a[0][a[1] == k].mean(0) for k in range(4)])
    dists = ((a[0][:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dists.argmin(1) == a[1]).float().mean() > 0.9


def test_split_is_a_seeded_partition():
    x = torch.arange(50).float().view(50, 1, 1, 1)
    y = torch.arange(50) % 5
    (tx, ty), (vx, vy) = train_test_split(x, y, 0.2, seed=1)
    assert len(vx) == 10 and len(tx) == 40
    assert sorted(torch.cat([tx, vx]).flatten().tolist()) == list(range(50))
    assert torch.equal(ty, tx.flatten().long() % 5)
    (tx2, _), _ = train_test_split(x, y, 0.2, seed=1)
    assert torch.equal(tx, tx2)


def test_named_sources():
    digits = load_source("digits", size=16)
    assert digits.train[0].shape[1:] == (1, 16, 16) and digits.channels == 1
    assert len(digits.train[1]) + len(digits.test[1]) == 1797
    syn = load_source("synthetic", size=8, channels=3)
    assert syn.test[0].shape[1:] == (3, 8, 8) and syn.num_classes == 10
