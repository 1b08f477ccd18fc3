"""Ranking and classification metrics shared by the evaluators.

All functions take score matrices (higher = better) and return percentages in [0, 100], the unit the
FILIP and CLIP papers report. Ties are broken pessimistically, so that a constant score matrix does not
look perfect.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _rank_of_best_positive(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """For each query row, the 0-based rank of its best-scored positive column.

    The rank counts every column scoring at least as high as that positive, other than itself, so ties
    with negatives count against the query.
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive")
    scores = scores.float()
    best_positive = scores.masked_fill(~positives, float("-inf")).max(dim=1).values
    # Negatives scoring >= the best positive push it down; other positives never do.
    return ((scores >= best_positive[:, None]) & ~positives).sum(dim=1)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k with several positives per query: a hit when any positive ranks within the top k.

    scores: [Q, N] similarity of each query to each candidate. positives: [Q, N] bool.
    """
    ranks = _rank_of_best_positive(scores, positives.bool())
    return {k: 100.0 * float((ranks < k).float().mean()) for k in ks}


def positives_from_groups(query_groups: Sequence[int] | torch.Tensor,
                          candidate_groups: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The [Q, N] positive matrix where a query and a candidate match when their group ids are equal.

    Retrieval uses it with the image index as group: every caption of an image is a positive for it.
    """
    q = torch.as_tensor(query_groups)
    c = torch.as_tensor(candidate_groups)
    return q[:, None] == c[None, :]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                  ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy of [N, C] class scores against [N] integer labels (k larger than C is an error)."""
    num_classes = logits.shape[1]
    for k in ks:
        if k > num_classes:
            raise ValueError(f"top-{k} accuracy needs at least {k} classes, got {num_classes}")
    positives = torch.nn.functional.one_hot(labels.long(), num_classes).bool()
    return recall_at_k(logits, positives, ks)


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in `labels` of the share of their samples predicted correctly.

    Classes with no sample are left out rather than counted as zero, so a subset of a dataset gives
    an honest number.
    """
    predictions = predictions.long()
    labels = labels.long()
    correct = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    total.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    correct.index_add_(0, labels, (predictions == labels).double())
    present = total > 0
    return 100.0 * float((correct[present] / total[present]).mean())
