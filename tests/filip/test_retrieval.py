"""Image-text retrieval: caption grouping, block-wise scoring, and an end-to-end Flickr8k run."""
from __future__ import annotations

from pathlib import Path

import torch

from filip.checkpoint import load_for_inference
from filip.features import ImageFeatureBank, TextFeatureBank, score_matrices
from filip.loss import dense_late_interaction_scores
from filip.retrieval import evaluate_retrieval, load_captions, retrieval_recalls


def test_captions_are_grouped_by_image(flickr_dir: Path) -> None:
    data = load_captions(flickr_dir / "captions.csv", max_images=20)
    assert len(data.image_paths) == 20 and len(data.captions) == 100
    assert [data.caption_image.count(i) for i in range(20)] == [5] * 20
    assert all(p.is_file() for p in data.image_paths)


def test_block_scores_equal_the_dense_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(37, 16, 8, generator=generator), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(53, 12, 8, generator=generator), dim=-1)
    mask = torch.rand(53, 12, generator=generator) > 0.4
    mask[:, 0] = True
    images = ImageFeatureBank(tokens=img.half(), pooled=img[:, 0])
    texts = TextFeatureBank(tokens=txt.half(), mask=mask, pooled=txt[:, 0])
    # Tiny blocks force many uneven image and text blocks.
    i2t, t2i = score_matrices(images, texts, "filip", text_block=10, max_block_elements=20000)
    ref_i2t, ref_t2i = dense_late_interaction_scores(img.half().double(), txt.half().double(), mask)
    torch.testing.assert_close(i2t.double(), ref_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(t2i.double(), ref_t2i, atol=1e-5, rtol=0)


def test_recalls_use_each_direction_and_any_positive() -> None:
    caption_image = [0, 0, 1, 1]
    # Image 0 ranks caption 1 (its own) first; image 1 ranks caption 0 (wrong) first, its own next.
    i2t = torch.tensor([[0.1, 0.9, 0.0, 0.2], [0.9, 0.0, 0.5, 0.1]])
    # t2i is [images, captions] too: caption 0 scores both images 0.9, the other captions win.
    t2i = torch.tensor([[0.9, 0.5, 0.0, 0.3], [0.9, 0.1, 0.9, 0.9]])
    result = retrieval_recalls(i2t, t2i, caption_image)
    assert (result["i2t_r1"], result["i2t_r5"]) == (50.0, 100.0)
    # Ties count against the query: caption 0 misses at 1.
    assert result["t2i_r1"] == 75.0 and result["t2i_r10"] == 100.0


def test_retrieval_flickr_end_to_end(tiny_checkpoint: Path, flickr_dir: Path) -> None:
    bundle = load_for_inference(tiny_checkpoint)
    result = evaluate_retrieval(bundle, flickr_dir / "captions.csv", max_images=40)
    assert (result["num_images"], result["num_captions"]) == (40, 200)
    for direction in ("i2t", "t2i"):
        r1, r5, r10 = (result[f"{direction}_r{k}"] for k in (1, 5, 10))
        assert 0.0 <= r1 <= r5 <= r10 <= 100.0
    assert result["rsum"] == sum(result[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
