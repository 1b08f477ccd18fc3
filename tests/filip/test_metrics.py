"""Metrics on constructed scores whose answers are known."""
from __future__ import annotations

import pytest
import torch

from filip.metrics import mean_per_class_recall, positives_from_groups, recall_at_k, topk_accuracy


def test_perfect_features_give_full_recall() -> None:
    # 50 images, 5 captions each; caption features equal their image's feature.
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 32, generator=generator), dim=1)
    caption_image = torch.arange(50).repeat_interleave(5)
    scores = images @ images[caption_image].T
    positives = positives_from_groups(torch.arange(50), caption_image)
    assert recall_at_k(scores, positives) == {1: 100.0, 5: 100.0, 10: 100.0}
    assert recall_at_k(scores.T, positives.T) == {1: 100.0, 5: 100.0, 10: 100.0}


def test_shuffled_scores_give_chance() -> None:
    generator = torch.Generator().manual_seed(1)
    queries, candidates = 2000, 100
    scores = torch.rand(queries, candidates, generator=generator)
    positives = torch.zeros(queries, candidates, dtype=torch.bool)
    positives[torch.arange(queries), torch.randint(0, candidates, (queries,), generator=generator)] = True
    recalls = recall_at_k(scores, positives, (1, 10))
    # Chance is k / candidates: 1 % and 10 %, within sampling noise.
    assert recalls[1] == pytest.approx(1.0, abs=0.8)
    assert recalls[10] == pytest.approx(10.0, abs=2.5)


def test_any_positive_counts_and_ties_count_against() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5],
                           [0.2, 0.2, 0.2, 0.2]])
    positives = torch.tensor([[False, True, False, True],
                              [True, False, False, False]])
    # Row 0: the best positive (0.8) ranks second. Row 1: all tied, so ranked after 3 negatives.
    assert recall_at_k(scores, positives, (1, 2, 4)) == {1: 0.0, 2: 50.0, 4: 100.0}


def test_topk_accuracy_and_mean_per_class_recall() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.0, 5.0], [0.0, 5.0, 1.0], [1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    accuracy = topk_accuracy(logits, labels, (1, 2))
    assert accuracy == {1: 50.0, 2: 75.0}
    # Class 0: 1 of 2 right; class 1: 1 of 2 right; class 2 has no sample and is left out.
    assert mean_per_class_recall(logits.argmax(1), labels, 3) == 50.0
    with pytest.raises(ValueError, match="top-5"):
        topk_accuracy(logits, labels, (5,))


def test_mean_per_class_recall_weights_classes_equally() -> None:
    labels = torch.tensor([0] * 9 + [1])
    predictions = torch.zeros(10, dtype=torch.long)
    assert mean_per_class_recall(predictions, labels, 2) == 50.0  # accuracy would say 90


def test_query_without_positive_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
