"""Image-text retrieval on caption files (`image,caption`, several captions per image).

Image-to-text ranks all captions for each image with the image-to-text score; text-to-image ranks all
images for each caption with the text-to-image score (for FILIP the two late-interaction directions
differ; for CLIP both are the pooled cosine). A query counts as a hit at k when any of its positives
is among the top k.

FILIP scores come from `retrieval_score_matrices`: texts are sorted by their number of real tokens and
packed without padding, so each step is one float32 matrix product of a few hundred real text tokens
against a block of images' patches, followed by the two max-reductions while the block is still in
cache, with image blocks spread over the CPU threads. On 2 CPU cores 1,000 images x 5,000 captions of
Flickr8k's lengths take about 8 s instead of about 54 s with the block-wise scoring of
`filip.features` (bench/retrieval_eval.py).
"""
from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from filip.features import (ImageFeatureBank, ImagePathDataset, TextFeatureBank, extract_image_features,
                            extract_text_features, score_matrices)
from filip.metrics import positives_from_groups, recall_at_k

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
# Images and real text tokens per step: on a CPU the [tokens, patches x images] float32 block
# (512 x 1,568, about 3 MB) stays in cache between the matrix product and the reductions; 32-64
# images by 256-1,024 tokens measured alike. A GPU wants fewer, larger products (not measured).
CPU_BLOCKS = (32, 512)
CUDA_BLOCKS = (256, 16384)


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


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One index per set of bitwise identical rows of `rows` [N, ...], and each row's set number."""
    bits = rows.reshape(len(rows), -1).view(torch.int16)
    _, row_set = torch.unique(bits, dim=0, return_inverse=True)
    first = torch.full((int(row_set.max()) + 1,), len(rows))
    return first.scatter_reduce_(0, row_set, torch.arange(len(rows)), "amin"), row_set


def _packed_text_blocks(tokens: torch.Tensor, mask: torch.Tensor, token_block: int, device: torch.device
                        ) -> tuple[torch.Tensor, list[tuple[int, int, int, torch.Tensor]]]:
    """Texts sorted (stably) by their number of real tokens, cut into blocks of one length each.

    Returns the sort order and per block (first sorted text, end, real tokens per text, the block's
    real tokens [texts x length, D] in float32). Padding is dropped, so no product is spent on it and
    every max and mean of a block runs over real tokens only, with no mask.
    """
    counts = mask.sum(dim=1)
    order = torch.sort(counts, stable=True).indices
    lengths, sizes = torch.unique_consecutive(counts[order], return_counts=True)
    blocks: list[tuple[int, int, int, torch.Tensor]] = []
    start = 0
    for length, size in zip(lengths.tolist(), sizes.tolist()):
        members = order[start:start + size]
        # Boolean indexing keeps text order, then position order: text by text, `length` rows each.
        packed = tokens[members][mask[members]].to(device, torch.float32)
        step = max(1, token_block // length)
        for first in range(0, size, step):
            end = min(first + step, size)
            blocks.append((start + first, start + end, length, packed[first * length:end * length]))
        start += size
    return order, blocks


@contextlib.contextmanager
def _one_thread_per_op() -> Iterator[None]:
    """Runs torch operations on one thread each until exit (the setting is process-wide).

    The caller spreads independent blocks over as many Python threads as torch had instead. With a
    thread team per operation every small operation ends at a barrier, and on a shared, busy machine
    one descheduled thread stalls the others: 2-8x slower on a 2-core machine with other jobs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _late_interaction_blocks(image_tokens: torch.Tensor, text_tokens: torch.Tensor, mask: torch.Tensor,
                             device: torch.device, image_block: int, token_block: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """i2t and t2i as [N_texts, N_images] (texts are the rows: each block then fills whole rows)."""
    order, blocks = _packed_text_blocks(text_tokens, mask, token_block, device)
    n_images, patches, dim = image_tokens.shape
    i2t = torch.empty(len(text_tokens), n_images, device=device)
    t2i = torch.empty(len(text_tokens), n_images, device=device)
    # A CPU scores image blocks on all its threads at once; a few images still keep them all busy.
    threads = 1 if device.type == "cuda" else torch.get_num_threads()
    image_block = min(image_block, max(1, -(-n_images // threads)))

    def score_images(i0: int) -> None:
        i1 = min(i0 + image_block, n_images)
        with torch.inference_mode():  # thread-local: worker threads need their own
            # Columns in (patch, image) order: both reductions then run over an outer dimension of
            # a [texts, words, patches, images] view and vectorise over the contiguous images.
            columns = image_tokens[i0:i1].to(device, torch.float32).transpose(0, 1).reshape(-1, dim).T
            for j0, j1, length, tokens in blocks:
                sim = (tokens @ columns).view(j1 - j0, length, patches, i1 - i0)
                i2t[j0:j1, i0:i1] = sim.amax(dim=1).mean(dim=1)  # best word per patch, mean over patches
                t2i[j0:j1, i0:i1] = sim.amax(dim=2).mean(dim=1)  # best patch per word, mean over words

    if device.type == "cuda":
        for i0 in range(0, n_images, image_block):
            score_images(i0)
    else:
        with _one_thread_per_op(), ThreadPoolExecutor(threads) as pool:
            list(pool.map(score_images, range(0, n_images, image_block)))  # re-raises a worker's error
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(len(order))
    return i2t[unsort.to(device)], t2i[unsort.to(device)]


def retrieval_score_matrices(images: ImageFeatureBank, texts: TextFeatureBank, loss_kind: str,
                             device: str | torch.device = "cpu", image_block: int | None = None,
                             token_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N_images, N_texts] image-to-text and text-to-image scores on the CPU, as `score_matrices`.

    FILIP: the late-interaction scores of `filip.loss.late_interaction_scores`, in float32 from the
    16-bit features; only the order of the float32 sums differs from `score_matrices` (differences
    of ~1e-7 on unit-norm tokens). Bitwise identical images, or texts (real tokens and mask), are
    scored once, so duplicates tie exactly and the pessimistic tie rule of `filip.metrics` counts
    them. CLIP: `score_matrices` itself.
    """
    if loss_kind != "filip":
        return score_matrices(images, texts, loss_kind, device)
    mask = texts.mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every text needs at least one token that counts (a mask row is all False)")
    if len(images) == 0 or len(texts) == 0:
        return torch.empty(len(images), len(texts)), torch.empty(len(images), len(texts))
    device = torch.device(device)
    default_images, default_tokens = CUDA_BLOCKS if device.type == "cuda" else CPU_BLOCKS
    with torch.inference_mode():
        image_first, image_set = _unique_rows(images.tokens)
        text_key = torch.cat([texts.tokens.masked_fill(~mask[..., None], 0).flatten(1),
                              mask.to(texts.tokens.dtype)], dim=1)
        text_first, text_set = _unique_rows(text_key)
        i2t, t2i = _late_interaction_blocks(images.tokens[image_first], texts.tokens[text_first],
                                            mask[text_first], device, image_block or default_images,
                                            token_block or default_tokens)
    # Outside inference mode, so the caller gets ordinary tensors it may change in place.
    image_set, text_set = image_set.to(device), text_set.to(device)
    return (i2t[text_set][:, image_set].T.contiguous().cpu(),
            t2i[text_set][:, image_set].T.contiguous().cpu())


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
    i2t, t2i = retrieval_score_matrices(images, texts, bundle.loss_kind, device)
    result = retrieval_recalls(i2t, t2i, data.caption_image)
    result.update(num_images=len(data.image_paths), num_captions=len(data.captions))
    return result
