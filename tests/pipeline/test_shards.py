"""The final training shards of the reference run, read by the tools users read them with."""
from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline.shards import shuffle_keys


def _manifest(out):
    return json.loads((out / "shards" / "manifest.json").read_text())


def test_shards_are_full_but_the_last_and_match_the_manifest(reference_run) -> None:
    out, summary, expected, config = reference_run
    manifest = _manifest(out)
    per_shard = config.shards.samples_per_shard
    counts = [s["samples"] for s in manifest["shards"]]
    kept = sum(e.status == "kept" for e in expected)
    assert sum(counts) == manifest["total_samples"] == kept
    assert all(c == per_shard for c in counts[:-1]) and 0 < counts[-1] <= per_shard
    assert len(counts) == -(-kept // per_shard)
    assert manifest["config_sha256"] and manifest["libraries"]["img2dataset"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for entry in manifest["shards"]:
        with tarfile.open(out / "shards" / entry["name"]) as archive:
            names = archive.getnames()
        assert len(names) == 3 * entry["samples"]
        assert pq.read_metadata(out / "shards" / entry["parquet"]).num_rows == entry["samples"]


def test_order_is_the_seeded_shuffle_and_keys_come_from_the_download(reference_run) -> None:
    out, _, _, config = reference_run
    manifest = _manifest(out)
    keys = [k for s in manifest["shards"] for k in pq.read_table(out / "shards" / s["parquet"])["key"].to_pylist()]
    hashes = shuffle_keys(keys, config.shards.seed)
    assert list(hashes) == sorted(hashes) and keys != sorted(keys)
    kept = pq.read_table(out / "decisions.parquet").to_pylist()
    assert sorted(keys) == sorted(d["key"] for d in kept if d["status"] == "kept")


def test_webdataset_library_reads_jpg_txt_json(reference_run) -> None:
    import webdataset as wds

    out, _, _, _ = reference_run
    manifest = _manifest(out)
    urls = [str(out / "shards" / s["name"]) for s in manifest["shards"]]
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


def test_parquet_reads_with_pyarrow_and_duckdb(reference_run) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb comes with the test extra")
    out, _, _, _ = reference_run
    manifest = _manifest(out)
    table = pq.ParquetDataset(
        [str(out / "shards" / s["parquet"]) for s in manifest["shards"]]).read()
    assert table.num_rows == manifest["total_samples"]
    assert "image" not in table.column_names and "caption_bt_de" in table.column_names
    pattern = str(out / "shards" / "*.parquet")
    count, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{pattern}')").fetchall()[0]
    assert count == distinct == manifest["total_samples"]
    statuses = dict(duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{out / 'decisions.parquet'}') "
                               "GROUP BY status").fetchall())
    assert statuses["kept"] == count
