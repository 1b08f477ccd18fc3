"""Offline feature extraction and block-wise late-interaction scoring.

Token features are computed once per image and per text and kept on the CPU in 16-bit; scores are then
computed one block of images x one block of texts at a time, so memory never holds the full
images x texts x patches x tokens tensor (the FILIP paper's point about late interaction at inference).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset


# Elements of the [Bi, Bt, P, L] product one block may hold (float32: 4 bytes each), about 256 MB.
DEFAULT_BLOCK_ELEMENTS = 64 * 1024 * 1024


@dataclass
class ImageFeatureBank:
    """Pre-computed image features: L2-normalised patch tokens [N, P, D] (16-bit) and pooled [N, D]."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]


@dataclass
class TextFeatureBank:
    """Pre-computed text features: tokens [N, L, D] (16-bit), mask [N, L] of tokens that count, pooled."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]


class ImagePathDataset(Dataset):
    """Images read from a list of paths and passed through the checkpoint's image transform."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 on GPU matches training; CPU stays in float32 (CPU autocast is slow for small models).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


@torch.inference_mode()
def extract_image_features(model: torch.nn.Module, dataset: Dataset, device: str | torch.device = "cpu",
                           batch_size: int = 64, num_workers: int = 0,
                           progress: bool = False) -> ImageFeatureBank:
    """Encodes every image of `dataset` (items are [3, H, W] tensors) once."""
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    tokens, pooled = [], []
    for images in _progress(loader, len(loader), "image features", progress):
        with _autocast(device):
            features = model.encode_image(images.to(device, non_blocking=True))
        tokens.append(features.tokens.to("cpu", torch.float16))
        pooled.append(features.pooled.to("cpu", torch.float32))
    return ImageFeatureBank(tokens=torch.cat(tokens), pooled=torch.cat(pooled))


@torch.inference_mode()
def extract_text_features(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str],
                          device: str | torch.device = "cpu", batch_size: int = 256,
                          progress: bool = False) -> TextFeatureBank:
    """Encodes every text once; trailing positions that no text uses are cut to save memory."""
    device = torch.device(device)
    tokens, masks, pooled = [], [], []
    starts = range(0, len(texts), batch_size)
    for start in _progress(starts, len(starts), "text features", progress):
        ids, mask = tokenizer(list(texts[start:start + batch_size]))
        with _autocast(device):
            features = model.encode_text(ids.to(device), mask.to(device))
        tokens.append(features.tokens.to("cpu", torch.float16))
        masks.append(features.mask.to("cpu", torch.bool))
        pooled.append(features.pooled.to("cpu", torch.float32))
    token_t, mask_t = torch.cat(tokens), torch.cat(masks)
    used = mask_t.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return TextFeatureBank(tokens=token_t[:, :length].contiguous(), mask=mask_t[:, :length].contiguous(),
                           pooled=torch.cat(pooled))


@dataclass
class ScoreBlock:
    """Scores of images [i0, i1) against texts [j0, j1): image-to-text and text-to-image, [Bi, Bt]."""

    i0: int
    i1: int
    j0: int
    j1: int
    i2t: torch.Tensor
    t2i: torch.Tensor


def iter_score_blocks(images: ImageFeatureBank, texts: TextFeatureBank, loss_kind: str,
                      device: str | torch.device = "cpu", text_block: int = 256,
                      max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Iterator[ScoreBlock]:
    """Yields score blocks covering all image-text pairs, images outer.

    For 'filip' checkpoints the scores are the paper's token-wise late interaction; for 'clip' both
    directions are the cosine similarity of the pooled features.
    """
    device = torch.device(device)
    if loss_kind == "clip":
        text_pooled = texts.pooled.to(device)
        step = 4096
        for i0 in range(0, len(images), step):
            i1 = min(i0 + step, len(images))
            sim = (images.pooled[i0:i1].to(device) @ text_pooled.T).float().cpu()
            yield ScoreBlock(i0, i1, 0, len(texts), sim, sim)
        return
    if loss_kind != "filip":
        raise ValueError(f"unknown loss kind {loss_kind!r} (expected 'filip' or 'clip')")
    from filip.loss import late_interaction_scores

    patches, length = images.tokens.shape[1], texts.tokens.shape[1]
    text_block = max(1, min(text_block, len(texts)))
    image_block = max(1, max_block_elements // (text_block * patches * length))
    # 16-bit matrix products are fast on GPUs only; the CPU scores in float32.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.inference_mode():
        for i0 in range(0, len(images), image_block):
            i1 = min(i0 + image_block, len(images))
            img = images.tokens[i0:i1].to(device, dtype)
            for j0 in range(0, len(texts), text_block):
                j1 = min(j0 + text_block, len(texts))
                # One chunk per call: the block size already bounds the [Bi, P, Bt, L] product.
                i2t, t2i = late_interaction_scores(img, texts.tokens[j0:j1].to(device, dtype),
                                                   texts.mask[j0:j1].to(device), i1 - i0)
                yield ScoreBlock(i0, i1, j0, j1, i2t.float().cpu(), t2i.float().cpu())


def score_matrices(images: ImageFeatureBank, texts: TextFeatureBank, loss_kind: str,
                   device: str | torch.device = "cpu", **block_args) -> tuple[torch.Tensor, torch.Tensor]:
    """The full [N_images, N_texts] image-to-text and text-to-image score matrices, filled by blocks."""
    i2t = torch.empty(len(images), len(texts))
    t2i = torch.empty(len(images), len(texts))
    for block in iter_score_blocks(images, texts, loss_kind, device, **block_args):
        i2t[block.i0:block.i1, block.j0:block.j1] = block.i2t
        t2i[block.i0:block.i1, block.j0:block.j1] = block.t2i
    return i2t, t2i
