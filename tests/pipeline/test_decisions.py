"""decisions/: every input row once, with its exact status, written per shard (in the driver or by
Ray tasks) and not rebuilt on a resumed run."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.decisions import SCHEMA, write_decisions
from pipeline.fakerun import STAGES, outcome, write_fake_run
from pipeline.storage import Storage

ROWS = 420


@pytest.fixture
def fake_run(tmp_path) -> tuple[Path, list[str]]:
    # Rejected parts of 4 rows: several rejected-PPPPP files, as a large run has.
    kept = write_fake_run(str(tmp_path / "out"), ROWS, shard_size=64, rejected_part_rows=4)
    return tmp_path / "out", list(kept)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "decisions").iterdir())}


def test_every_row_once_with_its_exact_status(fake_run) -> None:
    out, shards = fake_run
    stats = write_decisions(Storage(str(out)), STAGES, shards, progress=lambda msg: None)
    table = pq.read_table(out / "decisions")
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert sorted(r["row_id"] for r in rows) == list(range(ROWS))
    for row in rows:
        assert (row["status"], row["stage"], row["reason"]) == outcome(row["row_id"]), row
        expected_dup = str(row["row_id"] - 1) if row["reason"] == "duplicate_row" else None
        assert row["duplicate_of"] == expected_dup, row
        assert (row["key"] is None) == (row["stage"] == "input"), row
    # One file per input shard and per rejected part; each sorted by row_id.
    rejected = len(list((out / "input" / "rejected").iterdir()))
    assert sorted(_files(out)) == [f"{s}.parquet" for s in shards] + [
        f"rejected-{p:05d}.parquet" for p in range(rejected)]
    for path in (out / "decisions").iterdir():
        ids = pq.read_table(path)["row_id"].to_pylist()
        assert ids == sorted(ids) and ids
    expected = {"kept": 0, "dropped": 0, "failed_download": 0}
    for row_id in range(ROWS):
        expected[outcome(row_id)[0]] += 1
    assert dict(stats.counters) == expected
    assert (stats.stage, stats.rows_in, stats.rows_out, stats.shards) == ("decisions", ROWS, ROWS,
                                                                          len(shards) + rejected)


def test_ray_tasks_write_the_same_files_as_the_driver(fake_run, tmp_path, ray_session) -> None:
    out, shards = fake_run
    in_driver = write_decisions(Storage(str(out)), STAGES, shards, progress=lambda msg: None)
    expected = _files(out)
    (out / "decisions").rename(tmp_path / "first")
    said: list[str] = []
    on_ray = write_decisions(Storage(str(out)), STAGES, shards, progress=said.append, driver_max_shards=0)
    assert _files(out) == expected
    assert on_ray.counters == in_driver.counters
    assert "by Ray tasks" in said[0]


def test_a_resumed_run_writes_only_the_missing_files(fake_run) -> None:
    out, shards = fake_run
    storage = Storage(str(out))
    write_decisions(storage, STAGES, shards, progress=lambda msg: None)
    expected = _files(out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "decisions").iterdir()}
    (out / "decisions" / "00002.parquet").unlink()
    (out / "decisions" / "rejected-00001.parquet").unlink()
    stats = write_decisions(storage, STAGES, shards, progress=lambda msg: None)
    assert _files(out) == expected
    after = {p.name: p.stat().st_mtime_ns for p in (out / "decisions").iterdir()}
    rewritten = sorted(name for name in after if after[name] != before[name])
    assert rewritten == ["00002.parquet", "rejected-00001.parquet"]
    assert sum(stats.counters.values()) == ROWS  # the skipped files are counted from disk


def test_an_empty_run_leaves_a_readable_empty_folder(tmp_path) -> None:
    storage = Storage(str(tmp_path / "out"))
    stats = write_decisions(storage, STAGES, [], progress=lambda msg: None)
    table = pq.read_table(tmp_path / "out" / "decisions")
    assert (table.num_rows, table.schema, stats.rows_in) == (0, SCHEMA, 0)


def test_the_build_records_the_step_and_its_seconds(reference_run) -> None:
    out, summary, expected, _ = reference_run
    stats = json.loads((out / "stats.json").read_text())
    step = next(s for s in stats["steps"] if s["stage"] == "decisions")
    kept = sum(e.status == "kept" for e in expected)
    assert step["rows_in"] == step["rows_out"] == len(expected) and step["seconds"] > 0
    assert step["counters"]["kept"] == kept
    assert not (out / "decisions.parquet").exists()
    assert pq.read_table(out / "decisions").num_rows == len(expected)
