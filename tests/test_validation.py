import math

import pytest
import torch

from fastpurify.validation import (InputError, check_fraction, check_images, check_labels, check_num_classes,
                                   check_positive, check_positive_int, check_target)


def test_images_accepts_valid(images):
    check_images(images, unit_range=True)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 8, 8), "rank 4"),
    (torch.rand(2, 1, 3, 8, 8), "rank 4"),
    (torch.rand(0, 3, 8, 8), "empty"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ([[0.0]], "torch.Tensor"),
])
def test_images_rejects(bad, message):
    with pytest.raises(InputError, match=message):
        check_images(bad)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_images_reject_non_finite(value):
    x = torch.rand(2, 3, 4, 4)
    x[1, 2, 3, 0] = value
    with pytest.raises(InputError, match="1 NaN or Inf"):
        check_images(x)


def test_images_unit_range():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        check_images(torch.rand(2, 3, 4, 4) * 2 - 0.5, unit_range=True)


@pytest.mark.parametrize("labels, kwargs, message", [
    (torch.tensor([0, 1, 10]), {"num_classes": 10}, r"\[0, 9\]"),
    (torch.tensor([0, -1]), {}, ">= 0"),
    (torch.tensor([0.0, 1.0]), {}, "integer"),
    (torch.tensor([[0, 1]]), {}, "1-D"),
    (torch.tensor([0, 1]), {"num_images": 3}, "one label per image"),
    (torch.tensor([], dtype=torch.int64), {}, "empty"),
])
def test_labels_rejects(labels, kwargs, message):
    with pytest.raises(InputError, match=message):
        check_labels(labels, **kwargs)


def test_target_and_classes():
    check_target(9, 10)
    for bad in (-1, 10, 1.5, True):
        with pytest.raises(InputError, match="target"):
            check_target(bad, 10)
    with pytest.raises(InputError, match="num_classes"):
        check_num_classes(1)


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, math.nan, "0.1"])
def test_fraction_outside_open_interval(rate):
    with pytest.raises(InputError, match=r"poison rate must lie in \(0, 1\)"):
        check_fraction(rate, "poison rate")


def test_fraction_closed_ends():
    check_fraction(1.0, "alpha", high_open=False)
    check_fraction(0.0, "x", low_open=False)


def test_positive_checks():
    with pytest.raises(InputError, match="positive integer"):
        check_positive_int(0, "epochs")
    with pytest.raises(InputError, match="positive finite"):
        check_positive(-1e-3, "lr")
