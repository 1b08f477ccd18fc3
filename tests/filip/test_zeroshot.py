"""Zero-shot classification: prompt ensemble definitions and an end-to-end run on CIFAR-10 images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from filip.checkpoint import load_for_inference
from filip.features import (ImageFeatureBank, ImagePathDataset, TextFeatureBank, extract_image_features,
                            extract_text_features)
from filip.loss import dense_late_interaction_scores
from filip.zeroshot import (DEFAULT_TEMPLATES, evaluate_zeroshot, list_image_folder, load_class_names,
                            load_templates, prompt_texts, zeroshot_logits)


def test_filip_logits_average_late_interaction_over_templates(tiny_checkpoint: Path,
                                                              cifar_dir: Path) -> None:
    bundle = load_for_inference(tiny_checkpoint)
    folders, paths, _ = list_image_folder(cifar_dir, max_per_class=1)
    templates = ["a photo of a {}.", "a drawing of the {}."]
    names = load_class_names(folders)
    images = extract_image_features(bundle.model, ImagePathDataset(paths, bundle.image_transform))
    prompts = extract_text_features(bundle.model, bundle.tokenizer, prompt_texts(names, templates))
    logits = zeroshot_logits(images, prompts, len(folders), "filip")
    i2t, _ = dense_late_interaction_scores(images.tokens.double(), prompts.tokens.double(), prompts.mask)
    # Prompts are class-major: the two templates of class c are columns 2c and 2c + 1.
    expected = i2t.view(len(paths), len(folders), len(templates)).mean(dim=2)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=0)


def test_clip_logits_use_the_renormalised_mean_class_embedding() -> None:
    generator = torch.Generator().manual_seed(0)
    image_pooled = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1)
    text_pooled = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    images = ImageFeatureBank(tokens=torch.zeros(4, 1, 8), pooled=image_pooled)
    prompts = TextFeatureBank(tokens=torch.zeros(6, 1, 8), mask=torch.ones(6, 1, dtype=torch.bool),
                              pooled=text_pooled)
    class_embedding = torch.nn.functional.normalize(text_pooled.view(3, 2, 8).mean(1), dim=1)
    torch.testing.assert_close(zeroshot_logits(images, prompts, 3, "clip"), image_pooled @ class_embedding.T)


def test_templates_and_class_names_from_files(tmp_path: Path) -> None:
    assert load_templates(None) == list(DEFAULT_TEMPLATES)
    (tmp_path / "t.txt").write_text("# comment\nitap of a {}.\n\na sketch of a {}.\n")
    assert load_templates(tmp_path / "t.txt") == ["itap of a {}.", "a sketch of a {}."]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(tmp_path / "bad.txt")
    assert load_class_names(["golden_retriever", "cat"]) == ["golden retriever", "cat"]
    (tmp_path / "names.txt").write_text("dog\nkitty\n")
    assert load_class_names(["a", "b"], tmp_path / "names.txt") == ["dog", "kitty"]
    with pytest.raises(ValueError, match="2 class names for 3"):
        load_class_names(["a", "b", "c"], tmp_path / "names.txt")


def test_zeroshot_cifar_end_to_end(tiny_checkpoint: Path, cifar_dir: Path) -> None:
    bundle = load_for_inference(tiny_checkpoint)
    result = evaluate_zeroshot(bundle, cifar_dir, max_per_class=8)
    assert (result["num_images"], result["num_classes"], result["num_templates"]) == (80, 10, 16)
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert 0.0 <= result["mean_per_class_recall"] <= 100.0
    # Same features, same numbers: nothing random at evaluation time.
    assert evaluate_zeroshot(bundle, cifar_dir, max_per_class=8) == result


def test_top5_only_with_five_classes(tiny_checkpoint: Path, cifar_dir: Path, tmp_path: Path) -> None:
    for name in ("cat", "dog", "ship"):
        (tmp_path / name).mkdir()
        for image in sorted((cifar_dir / name).iterdir())[:3]:
            (tmp_path / name / image.name).symlink_to(image)
    result = evaluate_zeroshot(load_for_inference(tiny_checkpoint), tmp_path,
                               templates=["a photo of a {}."])
    assert "top5" not in result and result["num_images"] == 9
