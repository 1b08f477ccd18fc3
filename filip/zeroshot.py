"""Zero-shot classification on ImageFolder datasets with prompt templates.

FILIP checkpoints score an image against every prompted class text with late interaction and average
the scores over the templates (the paper's prompt ensemble: token features of different prompts cannot
be averaged into one vector, their similarities can). CLIP-loss checkpoints use the usual averaged,
re-normalised class embedding.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from filip.features import (ImageFeatureBank, ImagePathDataset, TextFeatureBank,
                            extract_image_features, extract_text_features, iter_score_blocks)
from filip.metrics import mean_per_class_recall, topk_accuracy

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# A short CLIP-style prompt set (our own wording): varied photo conditions and styles around "{}".
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a good photo of a {}.",
    "a bad photo of the {}.",
    "a painting of a {}.",
    "a drawing of a {}.",
    "a toy {}.",
    "itap of a {}.",
    "a {} in a picture.",
)


def load_templates(path: str | Path | None) -> list[str]:
    """Templates from a text file, one per line with `{}` where the class name goes; None: defaults."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs a '{{}}' placeholder (bad: {bad[:3]})")
    return templates


def list_image_folder(root: str | Path,
                      max_per_class: int | None = None) -> tuple[list[str], list[Path], list[int]]:
    """Class folders (sorted, as torchvision's ImageFolder numbers them), image paths and labels.

    With `max_per_class` the first images of each class in sorted order are kept, so subsets are
    the same on every run.
    """
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders (expected the ImageFolder layout root/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files = files[:max_per_class] if max_per_class else files
        paths += files
        labels += [label] * len(files)
    return folders, paths, labels


def load_class_names(folders: Sequence[str], path: str | Path | None = None) -> list[str]:
    """Readable class names: from a file (one per line, in sorted folder order) or the folder names."""
    if path is None:
        return [folder.replace("_", " ") for folder in folders]
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{path}: {len(names)} class names for {len(folders)} class folders")
    return names


def prompt_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: text j belongs to class j // len(templates)."""
    return [template.format(name) for name in class_names for template in templates]


def zeroshot_logits(images: ImageFeatureBank, prompts: TextFeatureBank, num_classes: int,
                    loss_kind: str, similarity: str = "i2t",
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """[N_images, C] class scores from features of class-major prompts (C x T texts).

    similarity picks the late-interaction direction for FILIP: 'i2t' (mean over patches of the best
    token, the image-to-text score the paper's image classification uses), 't2i' or 'mean' of both.
    """
    num_templates = len(prompts) // num_classes
    if num_templates * num_classes != len(prompts):
        raise ValueError(f"{len(prompts)} prompts do not split into {num_classes} classes")
    if loss_kind == "clip":
        per_class = prompts.pooled.view(num_classes, num_templates, -1).mean(dim=1)
        per_class = torch.nn.functional.normalize(per_class, dim=-1)
        return images.pooled @ per_class.T
    if similarity not in ("i2t", "t2i", "mean"):
        raise ValueError(f"unknown similarity {similarity!r}")
    logits = torch.zeros(len(images), num_classes)
    class_of_text = torch.arange(len(prompts)) // num_templates
    # Accumulating each block into its classes keeps memory at [N, C], never [N, C x T].
    for block in iter_score_blocks(images, prompts, loss_kind, device):
        if similarity == "mean":
            scores = (block.i2t + block.t2i) / 2
        else:
            scores = block.i2t if similarity == "i2t" else block.t2i
        logits[block.i0:block.i1].index_add_(1, class_of_text[block.j0:block.j1], scores / num_templates)
    return logits


def evaluate_zeroshot(bundle, root: str | Path, templates: Sequence[str] | None = None,
                      class_names_file: str | Path | None = None, max_per_class: int | None = None,
                      similarity: str = "i2t", device: str | torch.device = "cpu", batch_size: int = 64,
                      progress: bool = False) -> dict:
    """Zero-shot top-1, top-5 (with at least 5 classes) and mean per-class recall, in percent."""
    folders, paths, labels = list_image_folder(root, max_per_class)
    class_names = load_class_names(folders, class_names_file)
    templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
    log.info("zero-shot %s: %d images, %d classes, %d templates", root, len(paths), len(folders),
             len(templates))
    images = extract_image_features(bundle.model, ImagePathDataset(paths, bundle.image_transform),
                                    device, batch_size, progress=progress)
    prompts = extract_text_features(bundle.model, bundle.tokenizer, prompt_texts(class_names, templates),
                                    device, progress=progress)
    logits = zeroshot_logits(images, prompts, len(folders), bundle.loss_kind, similarity, device)
    label_t = torch.tensor(labels)
    ks = (1, 5) if len(folders) >= 5 else (1,)
    accuracy = topk_accuracy(logits, label_t, ks)
    result = {f"top{k}": value for k, value in accuracy.items()}
    result["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), label_t, len(folders))
    result.update(num_images=len(paths), num_classes=len(folders), num_templates=len(templates))
    return result
