"""`filip retry-failed` reads decisions/ shard by shard: the failed rows of each input shard, whole."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.decisions import write_decisions
from pipeline.fakerun import STAGES, outcome, write_fake_run
from pipeline.retry import UnknownReasonError, failed_rows
from pipeline.storage import Storage

ROWS = 300


@pytest.fixture
def finished(tmp_path) -> str:
    out = str(tmp_path / "out")
    kept = write_fake_run(out, ROWS, shard_size=64, rejected_part_rows=4)
    write_decisions(Storage(out), STAGES, list(kept), progress=lambda msg: None)
    return out


def test_failed_rows_are_exactly_the_failed_downloads(finished) -> None:
    table = failed_rows(finished)
    failed = [i for i in range(ROWS) if outcome(i)[0] == "failed_download"]
    assert table["source_row_id"].to_pylist() == failed
    assert table["url"].to_pylist() == [f"https://example.com/{i}.jpg" for i in failed]
    assert table.column_names == ["source_row_id", "url", "caption"]
    assert failed_rows(finished, ["http_404"]).equals(table)


def test_an_unknown_reason_names_those_of_the_run(finished) -> None:
    with pytest.raises(UnknownReasonError, match=r"no row failed to download with reason timeout; "
                                                 r"reasons in this run: http_404 \(30\)"):
        failed_rows(finished, ["timeout"])


def test_a_run_of_an_earlier_version_is_read_from_its_one_file(finished, tmp_path) -> None:
    out = tmp_path / "out"
    merged = pq.read_table(out / "decisions")
    for path in (out / "decisions").iterdir():
        path.unlink()
    (out / "decisions").rmdir()
    pq.write_table(merged, out / "decisions.parquet")
    assert failed_rows(str(out))["source_row_id"].to_pylist() == [
        i for i in range(ROWS) if outcome(i)[0] == "failed_download"]


def test_no_decisions_names_what_was_looked_for(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="decisions not found"):
        failed_rows(str(tmp_path))
