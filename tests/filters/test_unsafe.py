"""The real NudeNet detector: same detections as the nudenet package, low false positives on Flickr."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from filters.unsafe import DRAFT_MARGIN, NUDENET_CLASSES, UnsafeFilterConfig, UnsafeScorer

# NudeNet on 2 CPU cores takes ~0.15-0.3 s per photo: every 5th photo (200 of the 1,000) keeps
# this under a minute; bench/filters_throughput.py measures all 1,000.
FPR_SUBSET_STEP = 5
DRAFT_PHOTO_STEP = 20  # 50 photos
DRAFT_MEAN_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def scorer() -> UnsafeScorer:
    scorer = UnsafeScorer()
    scorer.setup()
    yield scorer
    scorer.teardown()


def test_scores_match_the_nudenet_package(flickr_dir) -> None:
    from nudenet import NudeDetector

    paths = sorted((flickr_dir / "images").glob("*.jpg"))[:12]
    # All classes, so that faces (common in Flickr) give non-zero scores to compare.
    every_class = UnsafeScorer(UnsafeFilterConfig(classes=NUDENET_CLASSES))
    every_class.setup()
    ours = every_class.score_batch([path.read_bytes() for path in paths])
    detector = NudeDetector()
    theirs = np.array([max([hit["score"] for hit in detector.detect(str(path))], default=0.0) for path in paths])
    assert (theirs > 0).sum() >= 2
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_false_positive_rate_on_benign_flickr_photos(flickr_dir, scorer: UnsafeScorer) -> None:
    paths = sorted((flickr_dir / "images").glob("*.jpg"))[::FPR_SUBSET_STEP]
    scores = scorer.score_batch([path.read_bytes() for path in paths])
    assert scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    flagged = sum(scorer.reason(float(score)) == "unsafe_image" for score in scores)
    assert flagged / len(paths) <= 0.01, f"{flagged} of {len(paths)} benign photos flagged"


def test_reason_threshold(scorer: UnsafeScorer) -> None:
    threshold = scorer.config.threshold
    assert scorer.reason(threshold) == "unsafe_image"
    assert scorer.reason(np.nextafter(threshold, 0)) is None
    assert scorer.reason(0.0) is None


def test_undecodable_body_raises(scorer: UnsafeScorer) -> None:
    with pytest.raises(ValueError):
        scorer.score_batch([b"not an image"])


def test_unknown_class_is_rejected() -> None:
    with pytest.raises(ValueError):
        UnsafeScorer(UnsafeFilterConfig(classes=("NOT_A_CLASS",)))


def _jpeg(size: tuple[int, int], source: Image.Image | None = None) -> bytes:
    image = source.convert("RGB").resize(size, Image.LANCZOS) if source else Image.new("RGB", size, (120, 60, 30))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_session_is_sized_to_the_worker() -> None:
    import onnxruntime

    scorer = UnsafeScorer(threads=2)
    scorer.setup()
    options = scorer._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    # Without use_gpu the CPU provider only, even where onnxruntime offers CUDA.
    assert scorer.providers == ["CPUExecutionProvider"]


def test_threads_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        UnsafeScorer(threads=0)


def test_gpu_asked_without_cuda_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime offers CUDA here")
    scorer = UnsafeScorer(threads=1, use_gpu=True)
    with caplog.at_level("WARNING", logger="filters.unsafe"):
        scorer.setup()
    assert scorer.providers == ["CPUExecutionProvider"]
    assert "no CUDA provider" in caplog.text


@pytest.mark.gpu
def test_cuda_provider_when_gpus_are_given(flickr_dir) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA GPU")
    bodies = [path.read_bytes() for path in sorted((flickr_dir / "images").glob("*.jpg"))[:16]]
    config = UnsafeFilterConfig(classes=NUDENET_CLASSES)
    gpu = UnsafeScorer(config, use_gpu=True)
    gpu.setup()
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = UnsafeScorer(config)
    cpu.setup()
    np.testing.assert_allclose(gpu.score_batch(bodies), cpu.score_batch(bodies), atol=1e-3)


@pytest.mark.parametrize(("size", "draft", "decoded"), [
    ((2560, 1920), True, (640, 480)),  # 1/4: the longer side stays at 2 x input_size
    ((1280, 960), True, (640, 480)),  # 1/2
    ((1280, 960), False, (1280, 960)),
    ((1279, 959), True, (1279, 959)),  # under 4 x input_size: decoded as it is
])
def test_large_jpegs_decode_at_reduced_scale(size: tuple[int, int], draft: bool, decoded: tuple) -> None:
    assert DRAFT_MARGIN == 2.0  # the sizes above assume it
    pixels = UnsafeScorer(UnsafeFilterConfig(jpeg_draft=draft)).decode(_jpeg(size))
    assert pixels.shape == (decoded[1], decoded[0], 3)


def test_png_is_decoded_at_full_size() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (1280, 960)).save(buffer, "PNG")
    assert UnsafeScorer().decode(buffer.getvalue()).shape == (960, 1280, 3)


def test_reduced_decode_keeps_the_decisions_on_large_photos(flickr_dir) -> None:
    # Copies of real photos at 1,600 px; every class counts, so that faces give many scores to compare.
    bodies = []
    for path in sorted((flickr_dir / "images").glob("*.jpg"))[::DRAFT_PHOTO_STEP]:
        with Image.open(path) as photo:
            scale = 1600 / max(photo.size)
            bodies.append(_jpeg((round(photo.width * scale), round(photo.height * scale)), photo))
    scores = {}
    for draft in (True, False):
        scorer = UnsafeScorer(UnsafeFilterConfig(classes=NUDENET_CLASSES, jpeg_draft=draft))
        scorer.setup()
        scores[draft] = scorer.score_batch(bodies)
    threshold = UnsafeFilterConfig().threshold
    assert (scores[False] > 0).sum() >= 10 and (scores[False] >= threshold).sum() >= 5  # measured: 19, 9
    # A box near NudeNet's 0.2 cut can appear or vanish, so single scores may move by ~0.3; the mean
    # and the decisions must hold (here: mean 0.010, no decision moved; 200 copies at 1,280-2,560 px:
    # mean 0.006, 99.5% of decisions kept).
    assert np.abs(scores[True] - scores[False]).mean() <= DRAFT_MEAN_TOLERANCE
    assert ((scores[True] >= threshold) != (scores[False] >= threshold)).sum() <= 1
