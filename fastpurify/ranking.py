"""Ranking training images by how clean they look (PBE), and scoring such a ranking."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import InputError


def cosine_scores(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, classes) logit matrices (0 for a zero row)."""
    if reference.shape != current.shape or reference.dim() != 2:
        raise InputError(f"logits must be two (N, classes) matrices of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(current.shape)}")
    return F.cosine_similarity(reference.double(), current.double(), dim=1, eps=1e-12)


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices from the highest score to the lowest; ties keep index order."""
    return torch.sort(scores, descending=True, stable=True).indices


def _curve(ranking: torch.Tensor, positive: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs -> (precision at each cut-off k = 1..N, positive flag at each rank), float64."""
    if positive.dtype != torch.bool or positive.dim() != 1:
        raise InputError("positive must be a 1-D boolean tensor, one flag per image")
    if ranking.shape != positive.shape:
        raise InputError(f"the ranking holds {ranking.numel()} indices for {positive.numel()} images")
    hits = positive.to(ranking.device)[ranking].double()
    if not bool(hits.any()):
        raise InputError(f"{what} needs at least one positive image")
    precision = hits.cumsum(0) / torch.arange(1, hits.numel() + 1, device=hits.device, dtype=hits.dtype)
    return precision, hits


def average_precision(ranking: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of ``ranking`` (indices, best first) for the boolean ``positive``
    (one flag per index): the mean, over the positives, of the precision at each one's rank."""
    precision, hits = _curve(ranking, positive, "average precision")
    return float((precision * hits).sum() / hits.sum())


def precision_recall_curve(ranking: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall (float64, one value per cut-off) of taking the top k of ``ranking``
    (indices, best first) for k = 1..N, for the boolean ``positive`` (one flag per index):
    ``precision[k-1]`` = positives in the top k / k, ``recall[k-1]`` = positives in the top k /
    all positives. :func:`average_precision` is the sum of precision times each step of recall."""
    precision, hits = _curve(ranking, positive, "a precision-recall curve")
    return precision, hits.cumsum(0) / hits.sum()
