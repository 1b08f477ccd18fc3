"""`decisions.parquet`: one row for every input row, with its final status and why.

Built from the files the stages wrote: the input stage's rejected rows, each stage's dropped and
failed rows, and the rows that came through the last stage. Every row_id of the input appears once.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.download import download_decisions
from pipeline.stage import DROP_KIND, DROP_REASON
from pipeline.storage import Storage

COLUMNS = ["row_id", "key", "url", "caption", "status", "stage", "reason", "duplicate_of"]
SCHEMA = pa.schema([("row_id", pa.int64()), ("key", pa.string()), ("url", pa.string()),
                    ("caption", pa.string()), ("status", pa.string()), ("stage", pa.string()),
                    ("reason", pa.string()), ("duplicate_of", pa.string())])


def _frame(table: pa.Table, status: pa.Array | str, stage: str, reason) -> pa.Table:
    n = table.num_rows

    def col(name: str, kind: pa.DataType) -> pa.Array:
        if name in table.column_names:
            return table[name].cast(kind)
        return pa.nulls(n, kind)

    status_arr = pa.array([status] * n, pa.string()) if isinstance(status, str) else status
    reason_arr = reason if reason is not None else pa.nulls(n, pa.string())
    dup = col("duplicate_of", pa.string())
    if "duplicate_of_row" in table.column_names:  # input-stage duplicates name a row, not a key
        dup = pc.cast(table["duplicate_of_row"], pa.string())
    return pa.table([col("row_id", pa.int64()), col("key", pa.string()), col("url", pa.string()),
                     col("caption", pa.string()), status_arr, pa.array([stage] * n, pa.string()),
                     reason_arr, dup], schema=SCHEMA)


def _status_of(kinds: pa.ChunkedArray) -> pa.Array:
    return pa.array(["failed_download" if k == "failed" else "dropped" for k in kinds.to_pylist()], pa.string())


def collect_decisions(storage: Storage, stages: list[str], shards: list[str]) -> pa.Table:
    """All decisions of a run; `stages` are the per-shard stage folders in pipeline order."""
    parts = [_frame(storage.read_parquet(rel), "dropped", "input", None).set_column(
        6, "reason", storage.read_parquet(rel)[DROP_REASON]) for rel in storage.glob("input/rejected/*.parquet")]
    for stage in stages:
        for shard in shards:
            table = storage.read_parquet(f"{stage}/{shard}.parquet")
            if stage == "download":
                table = download_decisions(table)
            removed = table.filter(pc.invert(pc.is_null(table[DROP_REASON])))
            if removed.num_rows:
                status = _status_of(removed[DROP_KIND]) if stage == "download" else pa.array(
                    ["dropped"] * removed.num_rows, pa.string())
                parts.append(_frame(removed, status, stage, removed[DROP_REASON].combine_chunks()))
            if stage == stages[-1]:
                kept = table.filter(pc.is_null(table[DROP_REASON]))
                parts.append(_frame(kept, "kept", stage, None))
    result = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
    return result.sort_by("row_id")


def write_decisions(storage: Storage, stages: list[str], shards: list[str]) -> pa.Table:
    table = collect_decisions(storage, stages, shards)
    storage.write_parquet("decisions.parquet", table)
    return table
