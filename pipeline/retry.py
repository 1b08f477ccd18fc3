"""`filip retry-failed`: turn the rows that failed to download into a new URL list.

Failures such as timeouts and 5xx answers are often transient; the user re-runs them later as a
new build. The rows keep every column the input stage stored (extra columns included) and their
original `row_id` as `source_row_id`, so results can be joined back to the first run.
"""
from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.decisions import FOLDER, LEGACY_FILE, decision_files
from pipeline.errors import UserError
from pipeline.storage import Storage, write_file_atomically


class UnknownReasonError(UserError):
    """`--reason` names a reason no row of the run failed with (a typo would write an empty list)."""


def _check_reasons(output: str, asked: list[str], present: Counter) -> None:
    unknown = [r for r in asked if r not in present]
    if unknown:
        there = ", ".join(f"{r} ({n})" for r, n in sorted(present.items(), key=lambda kv: (-kv[1], kv[0])))
        raise UnknownReasonError(f"{output}: no row failed to download with reason {', '.join(unknown)}; "
                                 f"reasons in this run: {there or 'none, no download failed'}")


def failed_rows(output: str, reasons: list[str] | None = None) -> pa.Table:
    """The input rows of every failed download (of the given reasons), by row_id. Read shard by
    shard: the failures of input shard NNNNN are in decisions/NNNNN.parquet and their rows in
    input/NNNNN.parquet, so no list of row ids over the whole run is held."""
    storage = Storage(output)
    files = decision_files(storage)
    if not files:
        raise FileNotFoundError(f"{storage.full_url(FOLDER)} not found (nor {storage.full_url(LEGACY_FILE)} of "
                                "an earlier version): has the build finished?")
    if reasons:  # a first pass over the reasons alone: a typo fails before any input is read
        present: Counter = Counter()
        for rel in files:
            present.update(_failed(storage, rel)["reason"].to_pylist())
        _check_reasons(output, reasons, present)
    parts = []
    for rel in files:
        table = _failed(storage, rel)
        if reasons:
            table = table.filter(pc.is_in(table["reason"], pa.array(reasons, pa.string())))
        if table.num_rows:
            parts.extend(_input_rows(storage, rel, table["row_id"].combine_chunks()))
    if not parts:
        return pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    table = pa.concat_tables(parts, promote_options="default").sort_by("row_id")
    table = table.rename_columns(["source_row_id" if c == "row_id" else c for c in table.column_names])
    return table.drop_columns([c for c in ("key",) if c in table.column_names])


def _failed(storage: Storage, rel: str) -> pa.Table:
    table = storage.read_parquet(rel, columns=["row_id", "status", "reason"])
    return table.filter(pc.equal(table["status"], "failed_download")).select(["row_id", "reason"])


def _input_rows(storage: Storage, rel: str, wanted: pa.Array) -> list[pa.Table]:
    """The input rows among `wanted` of the shard that `rel` (a decisions file) describes."""
    if rel == LEGACY_FILE:  # one file for the whole run: any input shard may hold the rows
        sources = storage.glob("input/[0-9]*.parquet")
    else:  # decisions/NNNNN.parquet; the rejected-PPPPP files hold no download, hence no failure
        name = rel.rsplit("/", 1)[-1]
        sources = [f"input/{name}"] if name[:1].isdigit() else []
    found = []
    for source in sources:
        rows = storage.read_parquet(source)
        rows = rows.filter(pc.is_in(rows["row_id"], wanted))
        if rows.num_rows:
            found.append(rows)
    return found


def write_failed_rows(output: str, destination: str, reasons: list[str] | None = None) -> int:
    """Write the failed rows to `destination` atomically (a killed run leaves no partial list)."""
    table = failed_rows(output, reasons)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_file_atomically(destination, buffer.getvalue())
    return table.num_rows
