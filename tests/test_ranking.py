import pytest
import torch

from fastpurify import InputError
from fastpurify.ranking import average_precision, cosine_scores, precision_recall_curve, rank_descending


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


def test_precision_recall_curve_by_hand():
    # ranking 2, 0, 3, 1, 4 with positives {2, 3, 4}: the top k holds 1, 1, 2, 2, 3 positives
    ranking = torch.tensor([2, 0, 3, 1, 4])
    positive = torch.tensor([False, False, True, True, True])
    precision, recall = precision_recall_curve(ranking, positive)
    assert precision.dtype == recall.dtype == torch.float64
    assert precision.tolist() == pytest.approx([1 / 1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    assert recall.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 3 / 3])
    # average precision is the area under it: precision summed over the steps of recall
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    assert float((precision * steps).sum()) == pytest.approx(average_precision(ranking, positive))


def test_precision_recall_curve_against_scikit_learn():
    from sklearn.metrics import precision_recall_curve as sklearn_curve

    g = torch.Generator().manual_seed(1)
    scores = torch.randperm(50, generator=g).double()  # distinct scores: one threshold per image
    positive = torch.rand(50, generator=g) < 0.4
    positive[scores.argmin()] = True  # full recall only at the last cut-off: older versions stop there
    precision, recall = precision_recall_curve(rank_descending(scores), positive)
    expected_p, expected_r, _ = sklearn_curve(positive.numpy(), scores.numpy())
    # scikit-learn lists the cut-offs from the most images to the fewest and appends (1, 0)
    assert precision.tolist() == pytest.approx(expected_p[:-1][::-1].tolist())
    assert recall.tolist() == pytest.approx(expected_r[:-1][::-1].tolist())


def test_precision_recall_curve_checks_its_input():
    with pytest.raises(InputError, match="precision-recall curve needs at least one positive"):
        precision_recall_curve(torch.tensor([1, 0]), torch.tensor([False, False]))
    with pytest.raises(InputError, match="holds 2 indices for 3 images"):
        precision_recall_curve(torch.tensor([0, 1]), torch.tensor([True, False, True]))
