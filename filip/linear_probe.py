"""Linear probe: scikit-learn logistic regression on frozen pooled image features.

With a separate test folder the probe trains on one ImageFolder and tests on the other; with one
folder it is split by class (stratified) with a fixed seed, so repeated runs give the same number.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from filip.features import ImagePathDataset, extract_image_features
from filip.metrics import mean_per_class_recall, topk_accuracy
from filip.zeroshot import list_image_folder

log = logging.getLogger(__name__)


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     regularisation: float = 1.0, seed: int = 0, max_iter: int = 1000) -> dict:
    """Fits multinomial logistic regression; returns top-1 (and top-5 with >= 5 classes) and
    mean per-class recall on the test features, in percent."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    # Standardising keeps lbfgs well conditioned: normalised features have tiny per-dimension spread.
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(C=regularisation, max_iter=max_iter, random_state=seed)
    probe.fit(scaler.transform(train_x), train_y)
    probabilities = probe.predict_proba(scaler.transform(test_x))
    # predict_proba columns follow probe.classes_; map back to label ids so unseen classes score zero.
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    logits = torch.full((len(test_x), num_classes), -1.0, dtype=torch.float64)
    logits[:, torch.as_tensor(probe.classes_)] = torch.as_tensor(probabilities)
    labels = torch.as_tensor(test_y)
    ks = (1, 5) if num_classes >= 5 else (1,)
    result = {f"top{k}": v for k, v in topk_accuracy(logits, labels, ks).items()}
    result["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), labels, num_classes)
    result.update(num_train=len(train_x), num_test=len(test_x))
    return result


def evaluate_linear_probe(bundle, train_root: str | Path, test_root: str | Path | None = None,
                          test_fraction: float = 0.3, max_per_class: int | None = None,
                          regularisation: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                          batch_size: int = 64, progress: bool = False) -> dict:
    """Extracts pooled features of the images once and fits the probe on them."""
    from sklearn.model_selection import train_test_split

    def features(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
        _, paths, labels = list_image_folder(root, max_per_class)
        bank = extract_image_features(bundle.model, ImagePathDataset(paths, bundle.image_transform),
                                      device, batch_size, progress=progress)
        return bank.pooled.numpy().astype(np.float64), np.asarray(labels)

    if test_root is None:
        x, y = features(train_root)
        train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=test_fraction,
                                                            random_state=seed, stratify=y)
    else:
        (train_x, train_y), (test_x, test_y) = features(train_root), features(test_root)
    log.info("linear probe: %d train, %d test images", len(train_x), len(test_x))
    return fit_linear_probe(train_x, train_y, test_x, test_y, regularisation, seed)
