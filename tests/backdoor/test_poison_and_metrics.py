import pytest
import torch

from fastpurify.backdoor import SIG, BadNets, WaNet, evaluate, poison
from fastpurify.backdoor.badnets import PATCH
from fastpurify.validation import InputError

from .helpers import LabelReader, encode_labels


def data(n=100, classes=10, size=8):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    return torch.rand(n, 3, size, size, generator=g) * 0.9, labels


def test_poison_records_indices_and_changes_only_them():
    x, y = data()
    attack = BadNets(num_classes=10, target=0)
    p = poison((x, y), attack, 0.1, seed=3)
    idx = p.poison_indices
    assert idx.numel() == 10 and (y[idx] != 0).all()  # drawn from non-target images
    assert (p.labels[idx] == 0).all()
    assert torch.equal(p.images[idx][..., -3:, -3:], torch.tensor(PATCH).expand(10, 3, 3, 3))
    rest = ~p.is_poisoned
    assert torch.equal(p.images[rest], x[rest]) and torch.equal(p.labels[rest], y[rest])
    assert torch.equal(p.clean_labels, y) and int(p.is_poisoned.sum()) == 10
    again = poison((x, y), attack, 0.1, seed=3)
    other = poison((x, y), attack, 0.1, seed=4)
    assert torch.equal(again.poison_indices, idx) and not torch.equal(other.poison_indices, idx)
    img, label = p[int(idx[0])]
    assert label == 0 and img.shape == (3, 8, 8)


def test_clean_label_poisons_target_class_only():
    x, y = data()
    p = poison((x, y), SIG(num_classes=10, target=4), 0.08)
    assert (y[p.poison_indices] == 4).all() and torch.equal(p.labels, y)
    with pytest.raises(InputError, match="only 10 target-class"):
        poison((x, y), SIG(num_classes=10, target=4), 0.2)


def test_wanet_cross_samples_keep_labels():
    x, y = data()
    p = poison((x, y), WaNet(num_classes=10, target=1, cross_ratio=2), 0.1)
    cross = p.cross_indices
    assert cross.numel() == 20 and not set(cross.tolist()) & set(p.poison_indices.tolist())
    assert torch.equal(p.labels[cross], y[cross]) and not torch.allclose(p.images[cross], x[cross])


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.5, 2.0])
def test_poison_rate_must_be_inside_zero_one(rate):
    with pytest.raises(InputError, match=r"poison rate must lie in \(0, 1\)"):
        poison(data(), BadNets(num_classes=10), rate)


def test_poison_rejects_bad_labels_and_tiny_rates():
    x, y = data()
    with pytest.raises(InputError, match=r"\[0, 4\]"):
        poison((x, y), BadNets(num_classes=5), 0.1)
    with pytest.raises(InputError, match="poisons no image"):
        poison((x[:10], y[:10]), BadNets(num_classes=10), 0.01)


def test_asr_excludes_target_class_for_all_to_one():
    x, y = data(n=50, classes=5)
    x = encode_labels(x, y, 5)
    attack = BadNets(num_classes=5, target=2)
    honest = evaluate(LabelReader(5), x, y, attack)
    assert honest["acc"] == 1.0 and honest["asr"] == 0.0 and honest["ra"] == 1.0
    assert honest["n_asr"] == 40  # the 10 target-class images do not count
    backdoored = evaluate(LabelReader(5, target=2), x, y, attack)
    assert backdoored["acc"] == 1.0 and backdoored["asr"] == 1.0 and backdoored["ra"] == 0.0


def test_asr_counts_every_image_for_all_to_all():
    x, y = data(n=50, classes=5)
    x = encode_labels(x, y, 5)
    report = evaluate(LabelReader(5), x, y, BadNets(num_classes=5, mode="all2all"))
    assert report["n_asr"] == 50 and report["asr"] == 0.0 and report["ra"] == 1.0


def test_asr_with_only_target_images_is_an_error():
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(InputError, match="target class"):
        evaluate(LabelReader(3), x, torch.zeros(4, dtype=torch.int64), BadNets(num_classes=3, target=0))
