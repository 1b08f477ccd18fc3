"""The final training shards: layout and readers on the reference run; the driver's plan, the Ray
map and reduce tasks, and resumes on a synthetic run of a few hundred rows."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from pipeline.fakerun import write_fake_run
from pipeline.funnel import format_funnel
from pipeline.run_folder import record_config
from pipeline.shards import plan, split_evenly, write_final_shards
from pipeline.shuffle import final_index, map_group, shuffle_keys
from pipeline.storage import Storage


def _manifest(out: Path) -> dict:
    return json.loads((out / "shards" / "manifest.json").read_text())


def test_sizes_json_and_manifest_match_the_tars(reference_run) -> None:
    out, summary, expected, config = reference_run
    manifest = _manifest(out)
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    kept = sum(e.status == "kept" for e in expected)
    assert manifest["total_samples"] == kept == sum(sizes.values()) == summary["final_shards"]["samples"]
    assert len(manifest["shards"]) == -(-kept // config.shards.samples_per_shard)
    assert list(sizes) == [s["name"] for s in manifest["shards"]]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["tar"]) as archive:
            names = archive.getnames()
        assert sum(n.endswith(".jpg") for n in names) == sizes[entry["name"]] == entry["samples"]
        assert len(names) == 3 * entry["samples"]
        assert pq.read_metadata(out / entry["parquet"]).num_rows == entry["samples"]
        assert json.loads((out / "shards" / f"_{entry['name'][:-4]}.done").read_text()) == {
            "samples": entry["samples"]}
    assert manifest["config_sha256"] and manifest["libraries"]["img2dataset"]
    assert not (out / "_shuffle").exists() and not list((out / "shards").glob("*.parquet"))


def test_order_is_the_seeded_shuffle_and_keys_come_from_the_download(reference_run) -> None:
    out, _, _, config = reference_run
    manifest = _manifest(out)
    n_final = len(manifest["shards"])
    keys = []
    for j, entry in enumerate(manifest["shards"]):
        mine = pq.read_table(out / entry["parquet"])["key"].to_pylist()
        assert set(final_index(shuffle_keys(mine, config.shards.seed), n_final)) <= {j}
        keys += mine
    hashes = shuffle_keys(keys, config.shards.seed)
    assert list(hashes) == sorted(hashes) and keys != sorted(keys)
    kept = pq.read_table(out / "decisions").to_pylist()
    assert sorted(keys) == sorted(d["key"] for d in kept if d["status"] == "kept")


def test_folder_readers_open_the_parquet_folder(reference_run) -> None:
    import pandas as pd
    import pyarrow.dataset as ds

    out, _, _, _ = reference_run
    total = _manifest(out)["total_samples"]
    table = ds.dataset(out / "shards_parquet").to_table()
    assert table.num_rows == len(pd.read_parquet(out / "shards_parquet")) == total
    assert "image" not in table.column_names and "caption_bt_de" in table.column_names


def test_webdataset_library_reads_jpg_txt_json(reference_run) -> None:
    import webdataset as wds

    out, _, _, _ = reference_run
    manifest = _manifest(out)
    urls = [str(out / s["tar"]) for s in manifest["shards"]]
    # open_clip's loader: .to_tuple("jpg;png;jpeg;webp", "txt") after decoding to PIL.
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    seen = 0
    for image, caption, meta in dataset:
        assert min(image.size) >= 100 and caption == meta["caption"]
        assert {"url", "original_width", "original_height", "sha256", "phash", "unsafe_score",
                "caption_bt_de", "caption_bt_ru"} <= set(meta)
        seen += 1
    assert seen == manifest["total_samples"]


def test_ray_data_reads_the_shards(reference_run, ray_session) -> None:
    import ray.data

    out, _, _, _ = reference_run
    manifest = _manifest(out)
    rows = ray.data.read_webdataset(str(out / "shards"), file_extensions=["tar"]).take_all()
    assert len(rows) == manifest["total_samples"]
    assert {"__key__", "jpg", "txt", "json"} <= set(rows[0])


def test_parquet_reads_with_duckdb(reference_run) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb comes with the test extra")
    out, _, _, _ = reference_run
    total = _manifest(out)["total_samples"]
    pattern = str(out / "shards_parquet" / "*.parquet")
    count, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{pattern}')").fetchall()[0]
    assert count == distinct == total
    statuses = dict(duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{out / 'decisions'}/*.parquet') "
                               "GROUP BY status").fetchall())
    assert statuses["kept"] == count


def test_stats_record_the_step_and_the_funnel_shows_every_seconds(reference_run) -> None:
    out, summary, _, _ = reference_run
    step = next(s for s in summary["steps"] if s["stage"] == "shards")
    total = summary["final_shards"]["samples"]
    assert (step["rows_in"], step["rows_out"], step["counters"]) == (
        total, total, {"final_shards": summary["final_shards"]["shards"]})
    assert step["seconds"] > 0
    text = format_funnel(summary)
    for entry in summary["stages"] + summary["steps"]:
        assert f"{entry['seconds']:.1f}" in text
    assert f"step: shards{'':<10}{total:>12,}{total:>12,}{'':>8}{step['seconds']:>10.1f}" in text


# ---- the plan, the tasks and resumes, on a synthetic run --------------------------------------

ROWS = 600


def test_final_index_cuts_equal_hash_ranges() -> None:
    import numpy as np

    top = 2**64 - 1
    hashes = np.array([0, 2**64 // 3 - 1, 2**64 // 3, 2 * 2**64 // 3, top], np.uint64)
    assert final_index(hashes, 3).tolist() == [0, 0, 1, 2, 2]
    assert final_index(hashes, 1).tolist() == [0] * 5


def test_plan_balances_rows_and_fills_the_workers() -> None:
    kept = {"00000": 50, "00001": 10, "00002": 40, "00003": 100}
    assert split_evenly(kept, 2) == [["00000", "00001", "00002"], ["00003"]]
    assert split_evenly(kept, 1) == [list(kept)]
    assert split_evenly(kept, 9) == [[s] for s in kept]
    layout = plan(kept, n_final=5, workers=2, rows_per_task=1000)
    assert layout == {"n_final": 5, "groups": [["00000", "00001", "00002"], ["00003"]], "bucket_starts": [0, 2]}
    assert plan(kept, n_final=5, workers=1, rows_per_task=60)["bucket_starts"] == [0, 1, 2, 3]
    assert plan(kept, n_final=5, workers=1, rows_per_task=40)["bucket_starts"] == [0, 1, 2, 3, 4]


@pytest.fixture
def synthetic(tmp_path) -> tuple[Path, dict[str, int]]:
    out = tmp_path / "synthetic"
    return out, write_fake_run(str(out), ROWS, shard_size=64)


def _cut(out: Path, kept: dict[str, int], **kwargs) -> list[str]:
    said: list[str] = []
    storage = Storage(str(out))
    config = config_from_dict({"run": {"input": "urls.csv", "output": str(out)}, "shards": {"samples_per_shard": 40}})
    record_config(config, storage)
    write_final_shards(storage, config, "inspect", kept, said.append, **kwargs)
    return said


def _digest(out: Path) -> dict:
    digest: dict = {f"{folder}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                    for folder in ("shards", "shards_parquet") for p in sorted((out / folder).iterdir())}
    # The config digest covers the output path, which differs between the copies.
    digest["shards/manifest.json"] = {k: v for k, v in _manifest(out).items() if k != "config_sha256"}
    return digest


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("shards", "shards_parquet", "manifest.json"))
    return target


MAP_REDUCE = {"driver_max_rows": 0, "rows_per_task": 100}  # several map groups and reduce tasks


def test_the_driver_and_the_ray_tasks_cut_the_same_shards(synthetic, tmp_path, ray_session) -> None:
    out, kept = synthetic
    direct, tasks = _copy(out, tmp_path / "direct"), _copy(out, tmp_path / "tasks")
    _cut(out, kept)
    _cut(direct, kept, driver_max_rows=0)
    _cut(tasks, kept, **MAP_REDUCE)
    assert _digest(out) == _digest(direct) == _digest(tasks)
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert len(sizes) == 12 and sum(sizes.values()) == sum(kept.values())
    assert not (tasks / "_shuffle").exists()


def test_a_lost_final_shard_alone_is_written_again(synthetic, ray_session) -> None:
    out, kept = synthetic
    _cut(out, kept, **MAP_REDUCE)
    expected = _digest(out)
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    for rel in ("shards/00007.tar", "shards_parquet/00007.parquet", "shards/_00007.done"):
        (out / rel).unlink()
    said = _cut(out, kept, **MAP_REDUCE)
    assert _digest(out) == expected
    assert [p.name for p in before if p.stat().st_mtime_ns != before[p]] == ["00007.tar"]
    assert "(1 written now)" in said[-1]


def test_a_run_killed_after_its_maps_reuses_their_parts(synthetic, tmp_path, ray_session) -> None:
    out, kept = synthetic
    reference = _copy(out, tmp_path / "reference")
    _cut(reference, kept, **MAP_REDUCE)
    # The state a kill leaves: the plan, every group's parts, two final shards written.
    _cut(out, kept, **MAP_REDUCE)
    storage = Storage(str(out))
    layout = plan(kept, 12, workers=2, rows_per_task=100)
    storage.write_json("_shuffle/plan.json", layout)
    for g, sources in enumerate(layout["groups"]):
        map_group(str(out), "inspect", g, sources, 0, 12, layout["bucket_starts"],
                  list(range(len(layout["bucket_starts"]))))
    for name in ("00003", "00011"):
        for rel in (f"shards/{name}.tar", f"shards_parquet/{name}.parquet", f"shards/_{name}.done"):
            (out / rel).unlink()
    # Without a stage file the maps could not run again: the result shows that they did not.
    (out / "inspect" / "00001.parquet").rename(tmp_path / "aside.parquet")
    said = _cut(out, kept, **MAP_REDUCE)
    assert _digest(out) == _digest(reference) and "(2 written now)" in said[-1]
    assert not (out / "_shuffle").exists()
