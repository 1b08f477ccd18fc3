"""The unsafe stage: its onnxruntime session sized to the stage's resources, and a real shard scored."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filters.unsafe import NUDENET_CLASSES, UnsafeFilterConfig, UnsafeScorer
from pipeline.stage import Resources
from pipeline.stages.unsafe import UnsafeStage
from pipeline.storage import Storage

PHOTOS = 12


def _write_shard(storage: Storage, bodies: list[bytes]) -> list[str]:
    """download/00000.tar as img2dataset writes it (key.jpg) and the dedup shard that names the keys."""
    keys = [f"00000{index:04d}" for index in range(len(bodies))]
    storage.makedirs("download")
    with tarfile.open(storage.path("download/00000.tar"), "w") as archive:
        for key, body in zip(keys, bodies):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    storage.write_parquet("dedup/00000.parquet", pa.table({
        "key": keys, "caption": ["a photo"] * len(keys),
        "drop_reason": pa.nulls(len(keys), pa.string()), "drop_kind": pa.nulls(len(keys), pa.string())}))
    return keys


@pytest.mark.parametrize(("num_cpus", "threads"), [(1.0, 1), (2.0, 2), (0.5, 1), (1.6, 2), (0.0, 1)])
def test_session_threads_follow_the_stage_cpus(tmp_path: Path, num_cpus: float, threads: int) -> None:
    resources = Resources(num_cpus=num_cpus, num_gpus=0.0 if num_cpus else 0.5)
    stage = UnsafeStage(str(tmp_path), "dedup", UnsafeFilterConfig(), resources)
    stage.setup()
    assert stage.scorer.threads == threads
    assert stage.scorer._session.get_session_options().intra_op_num_threads == threads
    assert stage.scorer.use_gpu == (resources.num_gpus > 0)


def test_cpu_stage_never_takes_the_gpu(tmp_path: Path) -> None:
    stage = UnsafeStage(str(tmp_path), "dedup", UnsafeFilterConfig(), Resources(num_cpus=1))
    stage.setup()
    assert stage.scorer.providers == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_gpu_stage_uses_the_cuda_provider(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA GPU")
    stage = UnsafeStage(str(tmp_path), "dedup", UnsafeFilterConfig(), Resources(num_cpus=1, num_gpus=1))
    stage.setup()
    assert stage.scorer.providers[0] == "CUDAExecutionProvider"


def test_shard_scores_and_decisions_match_the_scorer(tmp_path: Path, flickr_dir: Path) -> None:
    bodies = [path.read_bytes() for path in sorted((flickr_dir / "images").glob("*.jpg"))[:PHOTOS]]
    storage = Storage(str(tmp_path))
    keys = _write_shard(storage, bodies)
    # Every class counts, so that faces put some of these benign photos over the threshold.
    config = UnsafeFilterConfig(classes=NUDENET_CLASSES, batch_size=5)  # a partial last batch too
    stage = UnsafeStage(storage.url, "dedup", config, Resources(num_cpus=1, batch_size=7))
    stage.setup()
    stats = stage.run_shard("00000")
    reference = UnsafeScorer(config)
    reference.setup()
    expected = reference.score_batch(bodies)
    table = storage.read_parquet("unsafe/00000.parquet")
    assert table["key"].to_pylist() == keys
    np.testing.assert_array_equal(table["unsafe_score"].to_numpy(), expected)
    dropped = [reason == "unsafe_image" for reason in table["drop_reason"].to_pylist()]
    assert dropped == [bool(score >= config.threshold) for score in expected]
    assert 0 < sum(dropped) < PHOTOS
    assert (stats.rows_in, stats.rows_out, dict(stats.dropped)) == (PHOTOS, PHOTOS - sum(dropped),
                                                                     {"unsafe_image": sum(dropped)})
