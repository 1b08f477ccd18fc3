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
    storage = Storage(output)
    if not storage.exists("decisions.parquet"):
        raise FileNotFoundError(f"{storage.full_url('decisions.parquet')} not found: has the build finished?")
    decisions = storage.read_parquet("decisions.parquet", columns=["row_id", "status", "reason"])
    failed = decisions.filter(pc.equal(decisions["status"], "failed_download"))
    if reasons:
        _check_reasons(output, reasons, Counter(failed["reason"].to_pylist()))
        failed = failed.filter(pc.is_in(failed["reason"], pa.array(reasons, pa.string())))
    wanted = failed["row_id"].combine_chunks()
    parts = []
    for rel in storage.glob("input/[0-9]*.parquet"):
        rows = storage.read_parquet(rel)
        rows = rows.filter(pc.is_in(rows["row_id"], wanted))
        if rows.num_rows:
            parts.append(rows)
    if not parts:
        return pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    table = pa.concat_tables(parts, promote_options="default").sort_by("row_id")
    table = table.rename_columns(["source_row_id" if c == "row_id" else c for c in table.column_names])
    return table.drop_columns([c for c in ("key",) if c in table.column_names])


def write_failed_rows(output: str, destination: str, reasons: list[str] | None = None) -> int:
    """Write the failed rows to `destination` atomically (a killed run leaves no partial list)."""
    table = failed_rows(output, reasons)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_file_atomically(destination, buffer.getvalue())
    return table.num_rows
