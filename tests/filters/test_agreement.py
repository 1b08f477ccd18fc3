"""Image-text agreement: a tiny checkpoint trained here on generated scenes tells true captions from
shuffled ones; the pair score is the late interaction of filip.loss; the run-wide cut is exact to a bin."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from filters.agreement import (BIN_WIDTH, EDGES, N_BINS, AgreementConfig, AgreementScorer, pair_scores,
                               score_bins, score_histogram, top_fraction_cut)
from pipeline.configtools import ConfigError, from_mapping
from pipeline.errors import UserError

SCENE_SIZE = 32  # 4 x 4 patches of 8 px: the tiny preset's towers, trained in seconds on a CPU
TRAIN_SCENES = 512
HELD_OUT = 200


def scene_bytes(scene) -> bytes:
    buffer = io.BytesIO()
    scene.image.save(buffer, format="PNG")
    return buffer.getvalue()


def train_scene_checkpoint(path: Path, loss_kind: str, steps: int = 100) -> Path:
    """A tiny model trained on generated captioned scenes with the project's model and loss, saved
    as `filip train` saves it (its tokenizer inside)."""
    threads = torch.get_num_threads()
    # One thread: on a busy shared machine a team of threads waits at every small operation's barrier.
    torch.set_num_threads(1)
    try:
        return _train(path, loss_kind, steps)
    finally:
        torch.set_num_threads(threads)


def _train(path: Path, loss_kind: str, steps: int) -> Path:
    from filip.checkpoint import save_checkpoint
    from filip.data import eval_transform
    from filip.loss import ClipLoss, FilipLoss
    from filip.model import FilipModel, ModelConfig
    from filip.scenes import generate_scenes
    from filip.tokenizer import FilipTokenizer, train_tokenizer
    from filip.trainer import clamp_logit_scale

    torch.manual_seed(0)
    scenes = generate_scenes(TRAIN_SCENES, seed=0, size=SCENE_SIZE, grid=4)
    tokenizer_file = train_tokenizer([s.caption for s in scenes], path.with_suffix(".tokenizer"), 48)
    tokenizer = FilipTokenizer(tokenizer_file.read_bytes(), context_length=16)
    config = ModelConfig.preset("tiny", image_size=SCENE_SIZE, patch_size=8, embed_dim=64, vocab_size=64,
                                context_length=16)
    model = FilipModel(config)
    transform = eval_transform(SCENE_SIZE)
    images = torch.stack([transform(s.image) for s in scenes])
    ids, mask = tokenizer([s.caption for s in scenes])
    # No token selection: 16 patches learn too slowly when a quarter is kept.
    loss_fn = FilipLoss(token_keep_ratio=1.0, gather_dtype=None) if loss_kind == "filip" else ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        picked = torch.randint(0, TRAIN_SCENES, (64,), generator=generator)
        out = model(images[picked], ids[picked], mask[picked])
        if loss_kind == "filip":
            loss = loss_fn(out["image_tokens"], out["text_tokens"], out["text_mask"], out["logit_scale"])
        else:
            loss = loss_fn(out["image_pooled"], out["text_pooled"], out["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clamp_logit_scale(model)
    return save_checkpoint(path, model=model, model_config=config, tokenizer=tokenizer,
                           loss_kind=loss_kind, step=steps)


def scene_checkpoint(tmp_path_factory: pytest.TempPathFactory, loss_kind: str) -> Path:
    """Trained once per test session, whichever test module asks first."""
    path = tmp_path_factory.getbasetemp() / "agreement_checkpoints" / f"{loss_kind}.pt"
    return path if path.exists() else train_scene_checkpoint(path, loss_kind)


def half_shuffled(count: int, seed: int) -> tuple[list[bytes], list[str], np.ndarray]:
    """Held-out scenes (another seed than training); half of them get another scene's caption.
    Returns image bytes, captions, and which pairs are wrong (a caption that differs from its own)."""
    from filip.scenes import generate_scenes

    scenes = generate_scenes(count, seed=seed, size=SCENE_SIZE, grid=4)
    own = [s.caption for s in scenes]
    moved = np.random.default_rng(seed).permutation(count)[: count // 2]
    captions = list(own)
    for target, source in zip(moved, np.roll(moved, 1)):
        captions[target] = own[source]
    return [scene_bytes(s) for s in scenes], captions, np.array([c != o for c, o in zip(captions, own)])


@pytest.fixture(scope="module")
def filip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scene_checkpoint(tmp_path_factory, "filip")


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scene_checkpoint(tmp_path_factory, "clip")


def scorer_for(checkpoint: Path, **overrides) -> AgreementScorer:
    scorer = AgreementScorer(AgreementConfig(checkpoint=str(checkpoint), **overrides), threads=1)
    scorer.setup()
    return scorer


def dropped_wrong_share(checkpoint: Path) -> tuple[float, float, float]:
    """keep_top_fraction 0.5 on held-out scenes: the share of wrong pairs among the dropped, and the
    drop rates of wrong and of true pairs."""
    images, captions, wrong = half_shuffled(HELD_OUT, seed=99)
    scores = scorer_for(checkpoint, batch_size=48).score(images, captions)
    cut = top_fraction_cut(score_histogram(scores), 0.5).cut
    dropped = scores < cut
    return wrong[dropped].mean(), dropped[wrong].mean(), dropped[~wrong].mean()


def test_filip_checkpoint_drops_the_shuffled_captions(filip_checkpoint: Path) -> None:
    share, wrong_rate, true_rate = dropped_wrong_share(filip_checkpoint)
    # Measured: 0.84 of the dropped are shuffled (chance: 0.5); shuffled pairs dropped 5.4x as often.
    assert share >= 0.8, (share, wrong_rate, true_rate)
    assert wrong_rate >= 3 * true_rate


def test_clip_checkpoint_drops_the_shuffled_captions(clip_checkpoint: Path) -> None:
    share, wrong_rate, true_rate = dropped_wrong_share(clip_checkpoint)
    assert share >= 0.75, (share, wrong_rate, true_rate)  # measured: 0.83, shuffled dropped 5.0x as often
    assert wrong_rate >= 2.5 * true_rate


def test_filip_score_is_the_late_interaction_of_the_loss(filip_checkpoint: Path) -> None:
    from PIL import Image

    from filip.loss import late_interaction_scores

    images, captions, _ = half_shuffled(12, seed=5)
    scorer = scorer_for(filip_checkpoint, batch_size=5)  # three batches, the last one partial
    scores = scorer.score(images, captions)
    bundle = scorer.bundle
    pixels = torch.stack([bundle.image_transform(Image.open(io.BytesIO(b))) for b in images])
    with torch.inference_mode():
        image = bundle.model.encode_image(pixels)
        text = bundle.model.encode_text(*bundle.tokenizer(captions))
        i2t, t2i = late_interaction_scores(image.tokens, text.tokens, text.mask)
    expected = ((i2t.diagonal() + t2i.diagonal()) / 2).numpy()
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_pair_scores_match_the_loss_on_masked_tokens() -> None:
    from filip.loss import dense_late_interaction_scores

    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(6, 9, 8, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 7, 8, generator=generator), dim=-1)
    mask = torch.arange(7)[None, :] < torch.tensor([1, 2, 3, 5, 7, 4])[:, None]
    i2t, t2i = dense_late_interaction_scores(image, text, mask)
    torch.testing.assert_close(pair_scores(image, text, mask), (i2t.diagonal() + t2i.diagonal()) / 2)


def test_clip_score_is_the_pooled_cosine(clip_checkpoint: Path) -> None:
    from PIL import Image

    images, captions, _ = half_shuffled(8, seed=6)
    scorer = scorer_for(clip_checkpoint)
    bundle = scorer.bundle
    pixels = torch.stack([bundle.image_transform(Image.open(io.BytesIO(b))) for b in images])
    with torch.inference_mode():
        image = bundle.model.encode_image(pixels).pooled
        text = bundle.model.encode_text(*bundle.tokenizer(captions)).pooled
    expected = torch.nn.functional.cosine_similarity(image, text).numpy()
    np.testing.assert_allclose(scorer.score(images, captions), expected, atol=1e-5)


def test_an_image_that_does_not_decode_scores_nan(filip_checkpoint: Path) -> None:
    images, captions, _ = half_shuffled(3, seed=7)
    scores = scorer_for(filip_checkpoint).score([images[0], b"not an image", None], [captions[0], "a", None])
    assert np.isfinite(scores[0]) and np.isnan(scores[1:]).all()
    assert AgreementScorer.reason(float(scores[0]), float(scores[0]) + 1e-3) == "low_image_text_agreement"
    assert AgreementScorer.reason(float(scores[0]), float(scores[0])) is None
    assert AgreementScorer.reason(-1.0, None) is None


def test_scorer_refuses_a_missing_checkpoint_or_cuda_it_lacks(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^filip_score.checkpoint: not set"):
        AgreementScorer(AgreementConfig()).setup()
    with pytest.raises(UserError, match=f"^filip_score.checkpoint: {tmp_path / 'none.pt'}: no such file$"):
        AgreementScorer(AgreementConfig(checkpoint=str(tmp_path / "none.pt"))).setup()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"^checkpoint {garbage}: not a checkpoint"):
        AgreementScorer(AgreementConfig(checkpoint=str(garbage))).setup()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="^filip_score.device: cuda, but this worker sees no CUDA GPU"):
            AgreementScorer(AgreementConfig(checkpoint=str(garbage), device="cuda")).setup()


def test_scorer_restores_torch_threads(filip_checkpoint: Path) -> None:
    before = torch.get_num_threads()
    scorer = AgreementScorer(AgreementConfig(checkpoint=str(filip_checkpoint)), threads=1)
    scorer.setup()
    assert torch.get_num_threads() == 1
    scorer.teardown()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("section", "message"), [
    ({"threshold": 0.2}, ("<config>: threshold: set exactly one of threshold and keep_top_fraction, "
                          "the other to null (both are set)")),
    ({"keep_top_fraction": None}, ("<config>: threshold: set exactly one of threshold and "
                                   "keep_top_fraction, the other to null (neither is set)")),
    ({"keep_top_fraction": 0}, "<config>: keep_top_fraction: 0.0 is out of range (0, 1]"),
    ({"threshold": 1.5, "keep_top_fraction": None}, "<config>: threshold: 1.5 is out of range [-1, 1]"),
    ({"device": "gpu"}, "<config>: device: expected one of ['auto', 'cpu', 'cuda'], got 'gpu'"),
])
def test_config_errors_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        from_mapping(AgreementConfig, section)
    assert str(raised.value).startswith(message)


def test_config_defaults_keep_the_top_30_percent() -> None:
    config = from_mapping(AgreementConfig, {"checkpoint": "a.pt"})
    assert (config.threshold, config.keep_top_fraction, config.device) == (None, 0.3, "auto")
    config = from_mapping(AgreementConfig, {"threshold": 0.25, "keep_top_fraction": None})
    assert (config.threshold, config.keep_top_fraction) == (0.25, None)


def test_bins_follow_the_float32_edges() -> None:
    assert len(EDGES) == N_BINS + 1 and EDGES.dtype == np.float32 and (np.diff(EDGES) > 0).all()
    scores = np.array([-1.5, -1.0, EDGES[1], np.nextafter(EDGES[1], np.float32(-2)), 0.0, 1.0, 1.2],
                      dtype=np.float32)
    assert score_bins(scores).tolist() == [0, 0, 1, 0, N_BINS // 2, N_BINS - 1, N_BINS - 1]
    assert score_histogram(np.array([0.5, np.nan, 0.5], np.float32)).sum() == 2


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.01, 1.0])
def test_top_fraction_cut_is_within_one_bin_of_the_exact_quantile(fraction: float) -> None:
    rng = np.random.default_rng(11)
    scores = np.concatenate([rng.normal(0.2, 0.1, 700), np.full(40, 0.25), rng.uniform(-1, 1, 60)])
    scores = np.clip(scores, -1, 1).astype(np.float32)
    result = top_fraction_cut(score_histogram(scores), fraction)
    target = math.ceil(round(fraction * len(scores), 9))
    exact = np.sort(scores)[::-1][target - 1]  # the target-th highest score
    assert (result.rows, result.target) == (len(scores), target)
    if result.cut is not None:
        assert result.cut <= exact < result.cut + BIN_WIDTH
        kept = scores >= np.float32(result.cut)
    else:
        kept = np.ones(len(scores), bool)
    assert kept.sum() == result.kept >= target
    # Every row scoring like the last kept one is kept too: ties are never split.
    assert kept[scores == exact].all()


def test_top_fraction_cut_counts_a_decimal_fraction_exactly() -> None:
    scores = np.linspace(-0.5, 0.5, 10).astype(np.float32)
    result = top_fraction_cut(score_histogram(scores), 0.3)  # 0.3 x 10 is 3.0000000000000004 in floats
    assert (result.target, result.kept) == (3, 3)
    assert result.cut == float(EDGES[score_bins(scores[7:8])[0]])
    assert top_fraction_cut(np.zeros(N_BINS, np.int64), 0.3).cut is None


@pytest.mark.gpu
def test_gpu_scores_match_the_cpu(filip_checkpoint: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    images, captions, _ = half_shuffled(64, seed=8)
    cpu = scorer_for(filip_checkpoint).score(images, captions)
    gpu_scorer = AgreementScorer(AgreementConfig(checkpoint=str(filip_checkpoint)), use_gpu=True)
    gpu_scorer.setup()
    assert gpu_scorer.device == "cuda"
    np.testing.assert_allclose(gpu_scorer.score(images, captions), cpu, atol=0.03)  # bf16 towers
