"""Linear probe: known answers on constructed features, then frozen features of a tiny checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from filip.checkpoint import load_for_inference
from filip.linear_probe import evaluate_linear_probe, fit_linear_probe


def _clusters(rng: np.random.Generator, n: int, classes: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(classes, 16)) * 3
    labels = np.arange(n) % classes
    return centres[labels] + spread * rng.normal(size=(n, 16)), labels


def test_separable_features_give_full_accuracy() -> None:
    rng = np.random.default_rng(0)
    train_x, train_y = _clusters(rng, 300, 6, 0.1)
    test_x, test_y = train_x[:60] + 0.01, train_y[:60]
    result = fit_linear_probe(train_x, train_y, test_x, test_y)
    assert result["top1"] == 100.0 and result["mean_per_class_recall"] == 100.0
    assert result["top5"] == 100.0 and (result["num_train"], result["num_test"]) == (300, 60)


def test_random_labels_give_about_chance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16))
    y = rng.integers(0, 4, size=2000)
    result = fit_linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert result["top1"] == pytest.approx(25.0, abs=5.0)


def test_probe_is_reproducible() -> None:
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 200, 5, 3.0)
    assert fit_linear_probe(x[:150], y[:150], x[150:], y[150:], seed=3) == \
        fit_linear_probe(x[:150], y[:150], x[150:], y[150:], seed=3)


def test_probe_on_cifar_features(tiny_checkpoint: Path, cifar_dir: Path) -> None:
    result = evaluate_linear_probe(load_for_inference(tiny_checkpoint), cifar_dir, max_per_class=8)
    # 80 images, stratified 30 % test split: 8 per class would not split evenly, 24 do.
    assert (result["num_train"], result["num_test"]) == (56, 24)
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert 0.0 <= result["mean_per_class_recall"] <= 100.0
