"""Our writer of img2dataset's shard files against img2dataset's own (`WebDatasetSampleWriter`,
`write_stats`, `compute_key`), on the same samples: what a reader of img2dataset output sees must
be the same."""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.img2dataset_format import WebDatasetShardWriter, compute_key, write_stats

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's import asks PyPI otherwise

SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                    ("sha256", pa.string())])


def samples() -> list[tuple[bytes | None, str, str | None, dict]]:
    out = []
    for index in (3, 0, 2, 1, 4):  # completion order, not key order
        key = compute_key(index, 7, 4, 5)
        ok = index != 2
        meta = {"url": f"http://127.0.0.1/{index}.jpg", "caption": None if index == 4 else f"a dog, ünïcode {index}",
                "key": key, "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "timeout: read", "width": 256 if ok else None,
                "sha256": f"{index:064x}" if ok else None}
        out.append((bytes([index]) * (100 + index) if ok else None, key, meta["caption"], meta))
    return out


def members(path: Path) -> list[tuple]:
    with tarfile.open(path) as archive:
        return [(m.name, m.size, m.mode, m.uname, m.gname, m.type, archive.extractfile(m).read())
                for m in archive.getmembers()]


def test_keys_match_img2dataset() -> None:
    from img2dataset.downloader import compute_key as theirs

    for index, shard, per_shard, shards in [(0, 0, 4, 5), (17, 3, 4, 5), (9999, 12345, 4, 5), (5, 2, 2, 3)]:
        assert compute_key(index, shard, per_shard, shards) == theirs(index, shard, per_shard, shards)


def test_shard_files_match_img2dataset_writer(tmp_path: Path) -> None:
    from img2dataset.logger import CappedCounter
    from img2dataset.logger import write_stats as their_stats
    from img2dataset.writer import WebDatasetSampleWriter

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    mine = WebDatasetShardWriter(7, str(ours), SCHEMA, "jpg", 5)
    reference = WebDatasetSampleWriter(7, str(theirs), True, 5, SCHEMA, "jpg")
    for image, key, caption, meta in samples():
        mine.write(image, key, caption, dict(meta))
        reference.write(image, key, caption, dict(meta))
    written = mine.close()
    reference.close()

    assert members(ours / "00007.tar") == members(theirs / "00007.tar")
    assert [m[0] for m in members(ours / "00007.tar")][:3] == [
        "000070003.jpg", "000070003.json", "000070003.txt"]
    # img2dataset writes completion order; ours is sorted by key, the same rows.
    reference_rows = pq.read_table(theirs / "00007.parquet").sort_by("key")
    assert pq.read_table(ours / "00007.parquet").equals(reference_rows)
    assert written.equals(reference_rows)

    counts = Counter({"success": 4, "timeout: read": 1})
    capped = CappedCounter()
    for name, n in counts.items():
        for _ in range(n):
            capped.increment(name)
    write_stats(str(ours), 7, 5, 4, 1, 0, 100.0, 103.5, counts, 5)
    their_stats(str(theirs), 7, 5, 4, 1, 0, 100.0, 103.5, capped, 5)
    assert (ours / "00007_stats.json").read_text() == (theirs / "00007_stats.json").read_text()
    assert json.loads((ours / "00007_stats.json").read_text())["status_dict"] == dict(counts)


def test_an_empty_shard_writes_both_files(tmp_path: Path) -> None:
    writer = WebDatasetShardWriter(0, str(tmp_path), SCHEMA, "jpg", 5)
    assert writer.close().num_rows == 0
    assert members(tmp_path / "00000.tar") == []
    assert pq.read_table(tmp_path / "00000.parquet").schema.equals(SCHEMA)


@pytest.mark.parametrize("encode_format", ["png", "webp"])
def test_member_extension_is_the_encode_format(tmp_path: Path, encode_format: str) -> None:
    writer = WebDatasetShardWriter(0, str(tmp_path), SCHEMA, encode_format, 5)
    image, key, caption, meta = samples()[0]
    writer.write(image, key, caption, meta)
    writer.close()
    expected = {"png": ["json", "png", "txt"], "webp": ["json", "txt", "webp"]}[encode_format]  # webdataset's order
    assert [m[0] for m in members(tmp_path / "00000.tar")] == [f"{key}.{ext}" for ext in expected]
