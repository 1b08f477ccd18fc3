"""The filip_score and filip_cut stages on hand-written shards, without Ray: each step run as the
driver and the workers would, the run-wide cut checked against the quantile of all scores at once."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filters.agreement import BIN_WIDTH, AgreementConfig
from pipeline.errors import UserError
from pipeline.stage import Resources
from pipeline.stages.filip_score import CUT_FILE, FilipCutStage, FilipScoreStage, agreement_stages
from pipeline.storage import Storage
from tests.filters.test_agreement import half_shuffled, scene_checkpoint

SHARD_ROWS = {"00000": 40, "00001": 36, "00002": 24}  # 100 pairs, half of them shuffled


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scene_checkpoint(tmp_path_factory, "filip")


def write_run(storage: Storage, images: list[bytes | None], captions: list[str]) -> list[str]:
    """download/NNNNN.tar (key.png, as img2dataset writes) and the previous stage's shards (inspect),
    plus input/shards.json, the run's shard list; returns the keys in order."""
    keys, start = [], 0
    storage.makedirs("download")
    for shard, count in SHARD_ROWS.items():
        shard_keys = [f"{shard}{index:04d}" for index in range(count)]
        with tarfile.open(storage.path(f"download/{shard}.tar"), "w") as archive:
            for key, body in zip(shard_keys, images[start:start + count]):
                if body is not None:
                    info = tarfile.TarInfo(f"{key}.png")
                    info.size = len(body)
                    archive.addfile(info, io.BytesIO(body))
        storage.write_parquet(f"inspect/{shard}.parquet", pa.table({
            "key": shard_keys, "caption": captions[start:start + count],
            "drop_reason": pa.nulls(count, pa.string()), "drop_kind": pa.nulls(count, pa.string())}))
        keys += shard_keys
        start += count
    storage.write_json("input/shards.json", list(SHARD_ROWS))
    return keys


def run_stage(stage, shards: list[str]) -> dict[str, object]:
    """As pipeline/ray_adapter.py does: before_run on the driver, then each shard and its marker."""
    stage.before_run()
    stats = {}
    for shard in shards:
        stats[shard] = stage.run_shard(shard)
        stage.finish_shard(shard, stats[shard])
    stage.teardown()
    return stats


def column(storage: Storage, stage: str, name: str) -> list:
    return [value for s in SHARD_ROWS for value in storage.read_parquet(f"{stage}/{s}.parquet")[name].to_pylist()]


def test_top_fraction_across_shards_equals_the_quantile_of_all_scores(tmp_path: Path, checkpoint: Path) -> None:
    images, captions, wrong = half_shuffled(sum(SHARD_ROWS.values()), seed=123)
    storage = Storage(str(tmp_path / "out"))
    keys = write_run(storage, images, captions)
    config = AgreementConfig(checkpoint=str(checkpoint), keep_top_fraction=0.5, batch_size=16)
    score_stage, cut_stage = agreement_stages(storage.url, "inspect", config, Resources(batch_size=15))
    score_stats = run_stage(score_stage, list(SHARD_ROWS))
    assert all(s.rows_out == SHARD_ROWS[shard] for shard, s in score_stats.items())  # scoring drops none

    table = pa.concat_tables(storage.read_parquet(f"filip_score/{s}.parquet") for s in SHARD_ROWS)
    assert table["key"].to_pylist() == keys
    assert table.schema.field("filip_score").type == pa.float32()
    scores = table["filip_score"].to_numpy()
    histograms = [json.loads((tmp_path / "out" / f"filip_score/histograms/{s}.json").read_text())
                  for s in SHARD_ROWS]
    assert [sum(h["counts"]) for h in histograms] == list(SHARD_ROWS.values())

    cut_stats = run_stage(cut_stage, list(SHARD_ROWS))
    cut = json.loads((tmp_path / "out" / CUT_FILE).read_text())
    exact = np.sort(scores)[::-1][49]  # the 50th highest of all 100 scores, computed at once
    assert (cut["rows"], cut["target"], cut["shards"]) == (100, 50, 3)
    assert cut["cut"] <= exact < cut["cut"] + BIN_WIDTH
    kept = scores >= np.float32(cut["cut"])
    assert cut["kept"] == kept.sum() == sum(s.rows_out for s in cut_stats.values()) >= 50
    reasons = column(storage, "filip_cut", "drop_reason")
    assert reasons == [None if k else "low_image_text_agreement" for k in kept]
    assert column(storage, "filip_cut", "filip_score") == scores.tolist()
    # The point of the stage: a caption that belongs to another image is what gets dropped.
    assert wrong[~kept].mean() >= 0.8, (wrong[~kept].mean(), wrong.mean())


def test_cut_is_reused_on_resume_and_needs_every_shard(tmp_path: Path, checkpoint: Path) -> None:
    images, captions, _ = half_shuffled(sum(SHARD_ROWS.values()), seed=7)
    storage = Storage(str(tmp_path / "out"))
    write_run(storage, images, captions)
    config = AgreementConfig(checkpoint=str(checkpoint), keep_top_fraction=0.3)
    score_stage = FilipScoreStage(storage.url, "inspect", config, Resources(batch_size=64))
    run_stage(score_stage, ["00000", "00001"])
    with pytest.raises(UserError, match=r"filip_score: 1 shard\(s\) not scored yet \(e.g. 00002\)"):
        FilipCutStage(storage.url, config).before_run()
    run_stage(score_stage, ["00002"])
    first = FilipCutStage(storage.url, config)
    run_stage(first, ["00000"])
    written = storage.read_json(CUT_FILE)
    assert (written["keep_top_fraction"], written["target"]) == (0.3, 30)
    storage.write_json(CUT_FILE, {**written, "cut": 0.9999})  # a resumed run reads the file, not the scores
    resumed = FilipCutStage(storage.url, config)
    resumed.run_shard("00001")  # a worker whose driver ran before_run earlier
    assert set(storage.read_parquet("filip_cut/00001.parquet")["drop_reason"].to_pylist()) == {
        "low_image_text_agreement"}
    other = AgreementConfig(checkpoint=str(checkpoint), keep_top_fraction=0.5)
    with pytest.raises(UserError, match="computed for keep_top_fraction 0.3, not 0.5; remove the filip_cut"):
        FilipCutStage(storage.url, other).before_run()


def test_threshold_drops_in_the_scoring_stage_and_undecodable_images_fail(tmp_path: Path,
                                                                           checkpoint: Path) -> None:
    images, captions, wrong = half_shuffled(sum(SHARD_ROWS.values()), seed=9)
    images[3], images[50] = b"\x89PNG truncated", None  # a corrupt body and a key missing from the tar
    storage = Storage(str(tmp_path / "out"))
    write_run(storage, images, captions)
    stages = agreement_stages(storage.url, "inspect", AgreementConfig(
        checkpoint=str(checkpoint), threshold=0.5, keep_top_fraction=None), Resources(num_cpus=1))
    assert [s.name for s in stages] == ["filip_score"]
    stats = run_stage(stages[0], list(SHARD_ROWS))
    scores = column(storage, "filip_score", "filip_score")
    assert scores[3] is None and scores[50] is None
    expected = ["decode_error" if s is None else "low_image_text_agreement" if s < 0.5 else None for s in scores]
    assert column(storage, "filip_score", "drop_reason") == expected
    kinds = column(storage, "filip_score", "drop_kind")
    assert (kinds[3], kinds[50]) == ("failed", "failed")
    assert {k for i, k in enumerate(kinds) if i not in (3, 50)} <= {None, "dropped"}
    assert stats["00000"].failed == {"decode_error": 1} and stats["00001"].failed == {"decode_error": 1}
    low = np.array([r == "low_image_text_agreement" for r in expected])
    # Measured: 35 of the 98 scored pairs are below 0.5, all of them shuffled ones.
    assert 20 <= low.sum() <= 60 and wrong[low].mean() >= 0.9
    assert sum(sum(s.dropped.values()) for s in stats.values()) == low.sum()
    histogram = storage.read_json("filip_score/histograms/00000.json")
    assert sum(histogram["counts"]) == SHARD_ROWS["00000"] - 1  # the failed row is not counted


def test_a_shard_with_no_rows_scores_nothing_and_loads_no_model(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    storage.write_parquet("inspect/00000.parquet", pa.table({
        "key": pa.array([], pa.string()), "caption": pa.array([], pa.string()),
        "drop_reason": pa.array([], pa.string())}))
    storage.makedirs("download")
    tarfile.open(storage.path("download/00000.tar"), "w").close()
    config = AgreementConfig(checkpoint=str(tmp_path / "never-loaded.pt"), keep_top_fraction=0.3)
    score_stage, cut_stage = agreement_stages(storage.url, "inspect", config)
    stats = score_stage.run_shard("00000")
    score_stage.finish_shard("00000", stats)
    assert (stats.rows_in, score_stage.scorer) == (0, None)
    cut_stage.run_shard("00000")  # the driver's path for empty shards: no before_run
    assert storage.read_json(CUT_FILE)["cut"] is None


def test_both_steps_on_ray(tmp_path: Path, checkpoint: Path, ray_session) -> None:
    from pipeline.ray_adapter import run_stage as run_on_ray

    images, captions, wrong = half_shuffled(sum(SHARD_ROWS.values()), seed=123)
    storage = Storage(str(tmp_path / "out"))
    write_run(storage, images, captions)
    config = AgreementConfig(checkpoint=str(checkpoint), keep_top_fraction=0.5)
    for stage in agreement_stages(storage.url, "inspect", config, Resources(num_cpus=1, concurrency=1)):
        stats = run_on_ray(stage, list(SHARD_ROWS))
    scores = np.array(column(storage, "filip_score", "filip_score"), dtype=np.float32)
    cut = storage.read_json(CUT_FILE)
    assert cut["cut"] <= np.sort(scores)[::-1][49] < cut["cut"] + BIN_WIDTH
    kept = scores >= np.float32(cut["cut"])
    assert column(storage, "filip_cut", "drop_reason") == [None if k else "low_image_text_agreement" for k in kept]
    assert sum(s.rows_out for s in stats) == cut["kept"] == kept.sum()
    assert wrong[~kept].mean() >= 0.8


def test_the_driver_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^filip_score.checkpoint: not set"):
        FilipScoreStage(str(tmp_path), "inspect", AgreementConfig()).before_run()
    missing = tmp_path / "step_00000100.pt"
    with pytest.raises(UserError, match=f"^filip_score.checkpoint: {missing}: no such file$"):
        FilipScoreStage(str(tmp_path), "inspect", AgreementConfig(checkpoint=str(missing))).before_run()
