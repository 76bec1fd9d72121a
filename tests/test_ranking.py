import pytest
import torch

from fastpurify import InputError
from fastpurify.ranking import average_precision, cosine_scores, rank_descending


def test_cosine_scores_row_by_row():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0], [0.0, 3.0]])
    assert cosine_scores(a, b).tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    with pytest.raises(InputError, match="one shape"):
        cosine_scores(a, b[:2])


def test_ranking_is_descending_and_stable():
    assert rank_descending(torch.tensor([0.1, 0.9, 0.5, 0.9])).tolist() == [1, 3, 2, 0]


def test_average_precision_by_hand_and_against_scikit_learn():
    # ranking (best first) 2, 0, 3, 1, 4 with positives {2, 3, 4}: hits at ranks 1, 3, 5
    ranking = torch.tensor([2, 0, 3, 1, 4])
    positive = torch.tensor([False, False, True, True, True])
    assert average_precision(ranking, positive) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(torch.tensor([2, 3, 4, 0, 1]), positive) == 1.0

    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, generator=g)
    positive = torch.rand(200, generator=g) < 0.3
    expected = average_precision_score(positive.numpy(), scores.numpy())
    assert average_precision(rank_descending(scores), positive) == pytest.approx(expected)


def test_average_precision_needs_positives_and_matching_shapes():
    with pytest.raises(InputError, match="at least one positive"):
        average_precision(torch.tensor([0, 1]), torch.tensor([False, False]))
    with pytest.raises(InputError, match="holds 2 indices for 3 images"):
        average_precision(torch.tensor([0, 1]), torch.tensor([True, False, False]))
    with pytest.raises(InputError, match="boolean"):
        average_precision(torch.tensor([0, 1]), torch.tensor([1, 0]))
