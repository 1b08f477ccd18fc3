"""Image-text retrieval: caption grouping, block-wise and packed scoring, and an end-to-end Flickr8k run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from filip.checkpoint import load_for_inference
from filip.features import (ImageFeatureBank, ImagePathDataset, TextFeatureBank, extract_image_features,
                            extract_text_features, score_matrices)
from filip.loss import dense_late_interaction_scores
from filip.metrics import _rank_of_best_positive, positives_from_groups
from filip.retrieval import evaluate_retrieval, load_captions, retrieval_recalls, retrieval_score_matrices


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


def _retrieval_features(n_images: int = 23, per_image: int = 3, patches: int = 9, dim: int = 16,
                        positions: int = 14, seed: int = 0
                        ) -> tuple[ImageFeatureBank, TextFeatureBank, list[int]]:
    """Captions made of noisy copies of their image's patches, with start, end and padding masked out
    as the model emits them, one image and one caption duplicated (exact ties; the copy's padding
    differs), one all-real caption."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_images, patches, dim, generator=gen), dim=-1)
    img[7] = img[2]
    owner = torch.arange(n_images).repeat_interleave(per_image)
    picked = torch.randint(0, patches, (len(owner), positions), generator=gen)
    noise = torch.randn(len(owner), positions, dim, generator=gen)
    txt = torch.nn.functional.normalize(img[owner[:, None], picked] + 0.6 * noise, dim=-1)
    txt[4] = txt[10]  # a caption of image 1 repeats one of image 3
    lengths = torch.randint(3, positions + 1, (len(owner),), generator=gen)
    index = torch.arange(positions)[None]
    mask = (index > 0) & (index < lengths[:, None] - 1)
    mask[4], mask[5] = mask[10], True
    txt[4][~mask[4]] = torch.randn(int((~mask[4]).sum()), dim, generator=gen)  # padding does not count
    images = ImageFeatureBank(tokens=img.half(), pooled=img[:, 0])
    texts = TextFeatureBank(tokens=txt.half(), mask=mask, pooled=txt[:, 0])
    return images, texts, owner.tolist()


@pytest.mark.parametrize("image_block,token_block", [(None, None), (4, 7), (1, 1)])
def test_packed_scores_rank_as_the_block_scores(image_block: int | None, token_block: int | None) -> None:
    images, texts, owner = _retrieval_features()
    i2t, t2i = retrieval_score_matrices(images, texts, "filip", image_block=image_block,
                                        token_block=token_block)
    old_i2t, old_t2i = score_matrices(images, texts, "filip")
    ref_i2t, ref_t2i = dense_late_interaction_scores(images.tokens.double(), texts.tokens.double(),
                                                     texts.mask)
    torch.testing.assert_close(i2t.double(), ref_i2t, atol=1e-6, rtol=0)
    torch.testing.assert_close(t2i.double(), ref_t2i, atol=1e-6, rtol=0)
    # Ranks of every query's best positive, both ways, are those of the old scoring.
    positives = positives_from_groups(torch.arange(len(images)), owner)
    assert torch.equal(_rank_of_best_positive(i2t, positives), _rank_of_best_positive(old_i2t, positives))
    assert torch.equal(_rank_of_best_positive(t2i.T, positives.T),
                       _rank_of_best_positive(old_t2i.T, positives.T))
    recalls = retrieval_recalls(i2t, t2i, owner)
    assert recalls == retrieval_recalls(old_i2t, old_t2i, owner)
    assert 0.0 < recalls["i2t_r1"] < 100.0 and 0.0 < recalls["t2i_r1"] < 100.0


def test_packed_scores_keep_exact_ties_and_ignore_thread_count() -> None:
    images, texts, owner = _retrieval_features()
    threads = torch.get_num_threads()
    i2t, t2i = retrieval_score_matrices(images, texts, "filip", image_block=4, token_block=7)
    assert torch.get_num_threads() == threads  # restored after the one-thread-per-operation phase
    assert not i2t.is_inference()  # callers may change the scores in place
    # Duplicated image 7 = 2 and caption 4 = 10 score bitwise alike, in other blocks.
    for scores in (i2t, t2i):
        assert torch.equal(scores[7], scores[2]) and torch.equal(scores[:, 4], scores[:, 10])
    # Image 7 ties with image 2 for image 2's captions 6-8: the tie counts against them, as before.
    positives = positives_from_groups(torch.arange(len(images)), owner)
    ranks = _rank_of_best_positive(t2i.T, positives.T)
    assert bool((ranks[6:9] >= 1).all())
    old_t2i = score_matrices(images, texts, "filip")[1]
    assert torch.equal(ranks, _rank_of_best_positive(old_t2i.T, positives.T))
    torch.set_num_threads(1)
    try:
        one = retrieval_score_matrices(images, texts, "filip", image_block=4, token_block=7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], i2t) and torch.equal(one[1], t2i)


def test_packed_scores_need_a_real_token_per_text() -> None:
    images, texts, _ = _retrieval_features()
    texts.mask[3] = False
    with pytest.raises(ValueError, match="at least one token"):
        retrieval_score_matrices(images, texts, "filip")


def test_packed_scores_leave_clip_to_pooled_cosine() -> None:
    images, texts, _ = _retrieval_features()
    i2t, t2i = retrieval_score_matrices(images, texts, "clip")
    torch.testing.assert_close(i2t, images.pooled @ texts.pooled.T)
    assert torch.equal(i2t, t2i)


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
    # The same recalls as the old block-wise scoring of the same features.
    data = load_captions(flickr_dir / "captions.csv", max_images=40)
    images = extract_image_features(bundle.model, ImagePathDataset(data.image_paths, bundle.image_transform))
    texts = extract_text_features(bundle.model, bundle.tokenizer, data.captions)
    old = retrieval_recalls(*score_matrices(images, texts, bundle.loss_kind), data.caption_image)
    assert {k: result[k] for k in old} == old
