"""`Storage` and `arrow_filesystem` on local disk and on a real S3-compatible server (moto's)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset
import pytest

from pipeline.storage import Storage, StorageError, arrow_filesystem, url_to_fs


def test_round_trip_and_listing_on_s3(s3_bucket: str, s3_server) -> None:
    storage = Storage(s3_bucket)
    storage.check_writable()
    storage.write_json("stage/00000.stats.json", {"rows": 3})
    storage.write_parquet("stage/00000.parquet", pa.table({"key": ["a", "b"]}))
    assert storage.read_json("stage/00000.stats.json") == {"rows": 3}
    assert storage.read_parquet("stage/00000.parquet")["key"].to_pylist() == ["a", "b"]
    assert storage.glob("stage/*") == ["stage/00000.parquet", "stage/00000.stats.json"]
    assert storage.full_url("stage/00000.parquet") == f"{s3_bucket}/stage/00000.parquet"
    # What another client sees: the files under their final names, no temporary left.
    bucket_path = s3_bucket.removeprefix("s3://")
    assert sorted(s3_server.filesystem().find(bucket_path)) == [
        f"{bucket_path}/stage/00000.parquet", f"{bucket_path}/stage/00000.stats.json"]


def test_a_failed_write_leaves_nothing_on_s3(s3_bucket: str, s3_server) -> None:
    storage = Storage(s3_bucket)
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.atomic_open("stage/00000.tar") as handle:
            handle.write(b"half a shard")
            raise RuntimeError("writer died")
    assert s3_server.filesystem().find(s3_bucket.removeprefix("s3://")) == []


def test_a_marker_written_by_another_process_is_seen_after_a_listing(s3_bucket: str, s3_server) -> None:
    """The driver lists a stage folder, a worker (another client) writes a `.done` marker: the
    driver must see it, which a cached listing would hide."""
    storage = Storage(s3_bucket)
    storage.write_text("stage/00000.done", "")
    assert storage.glob("stage/*.done") == ["stage/00000.done"]
    s3_server.filesystem().pipe(f"{s3_bucket.removeprefix('s3://')}/stage/00001.done", b"")
    assert storage.exists("stage/00001.done")
    assert storage.glob("stage/*.done") == ["stage/00000.done", "stage/00001.done"]


def test_arrow_filesystem_reads_a_list_of_bucket_urls(s3_bucket: str) -> None:
    storage = Storage(s3_bucket)
    for shard, keys in (("00000", ["a", "b"]), ("00001", ["c"])):
        storage.write_parquet(f"stage/{shard}.parquet", pa.table({"key": keys}))
    urls = [storage.full_url(f"stage/{s}.parquet") for s in ("00000", "00001")]
    filesystem, paths = arrow_filesystem(urls)
    bucket_path = s3_bucket.removeprefix("s3://")
    assert paths == [f"{bucket_path}/stage/00000.parquet", f"{bucket_path}/stage/00001.parquet"]
    dataset = pa.dataset.dataset(paths, format="parquet", filesystem=filesystem)
    assert dataset.to_table()["key"].to_pylist() == ["a", "b", "c"]


def test_arrow_filesystem_local_and_mixed(tmp_path: Path, s3_bucket: str) -> None:
    local = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert arrow_filesystem(local) == (None, local)
    assert arrow_filesystem([]) == (None, [])
    with pytest.raises(StorageError, match="not on the filesystem of"):
        arrow_filesystem([f"{s3_bucket}/a.parquet", local[0]])


def test_missing_filesystem_package_names_it() -> None:
    with pytest.raises(StorageError, match=r"abfs://box/out: install adlfs to use abfs:// paths"):
        url_to_fs("abfs://box/out")
