"""Image-text retrieval on caption files (`image,caption`, several captions per image).

Image-to-text ranks all captions for each image with the image-to-text score; text-to-image ranks all
images for each caption with the text-to-image score (for FILIP the two late-interaction directions
differ; for CLIP both are the pooled cosine). A query counts as a hit at k when any of its positives
is among the top k.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from filip.features import ImagePathDataset, extract_image_features, extract_text_features, score_matrices
from filip.metrics import positives_from_groups, recall_at_k

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class CaptionSet:
    """Images in first-seen order, all captions, and for each caption the index of its image."""

    image_paths: list[Path]
    captions: list[str]
    caption_image: list[int]


def load_captions(csv_path: str | Path, images_dir: str | Path | None = None,
                  max_images: int | None = None) -> CaptionSet:
    """Reads `image,caption` rows; images live in `images_dir` (default: `images/` beside the file).

    With `max_images`, only the first images in file order (and all their captions) are kept.
    """
    csv_path = Path(csv_path)
    if images_dir is None:
        images_dir = csv_path.parent / "images"
        images_dir = images_dir if images_dir.is_dir() else csv_path.parent
    images_dir = Path(images_dir)
    index_of: dict[str, int] = {}
    captions: list[str] = []
    caption_image: list[int] = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: expected the columns image,caption, got {reader.fieldnames}")
        for row in reader:
            name = row["image"].strip()
            if name not in index_of:
                if max_images is not None and len(index_of) >= max_images:
                    continue
                index_of[name] = len(index_of)
            captions.append(row["caption"].strip())
            caption_image.append(index_of[name])
    paths = [images_dir / name for name in index_of]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {csv_path} not found, e.g. {missing[0]}")
    return CaptionSet(paths, captions, caption_image)


def retrieval_recalls(i2t: torch.Tensor, t2i: torch.Tensor, caption_image: list[int]) -> dict[str, float]:
    """R@1/5/10 both ways from [N_images, N_captions] scores, plus their sum (`rsum`)."""
    positives = positives_from_groups(torch.arange(i2t.shape[0]), caption_image)
    image_to_text = recall_at_k(i2t, positives, RECALL_KS)
    text_to_image = recall_at_k(t2i.T, positives.T, RECALL_KS)
    result = {f"i2t_r{k}": v for k, v in image_to_text.items()}
    result.update({f"t2i_r{k}": v for k, v in text_to_image.items()})
    result["rsum"] = sum(image_to_text.values()) + sum(text_to_image.values())
    return result


def evaluate_retrieval(bundle, captions_csv: str | Path, images_dir: str | Path | None = None,
                       max_images: int | None = None, device: str | torch.device = "cpu",
                       batch_size: int = 64, progress: bool = False) -> dict:
    """Recall at 1, 5 and 10 (percent) for image-to-text and text-to-image retrieval."""
    data = load_captions(captions_csv, images_dir, max_images)
    log.info("retrieval %s: %d images, %d captions", captions_csv, len(data.image_paths), len(data.captions))
    images = extract_image_features(bundle.model, ImagePathDataset(data.image_paths, bundle.image_transform),
                                    device, batch_size, progress=progress)
    texts = extract_text_features(bundle.model, bundle.tokenizer, data.captions, device, progress=progress)
    i2t, t2i = score_matrices(images, texts, bundle.loss_kind, device)
    result = retrieval_recalls(i2t, t2i, data.caption_image)
    result.update(num_images=len(data.image_paths), num_captions=len(data.captions))
    return result
