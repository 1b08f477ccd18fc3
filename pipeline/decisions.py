"""`decisions/`: one row for every input row, with its final status and why, one file per shard.

`decisions/NNNNN.parquet` holds the rows of input shard NNNNN (the stages' dropped and failed rows
and the rows that came through the last stage), sorted by `row_id`; `decisions/rejected-PPPPP.parquet`
holds the rows of `input/rejected/PPPPP.parquet`, refused before download. Every row_id of the input
appears once in the folder, which any Parquet reader opens as one dataset. Each file is built by a
Ray task from that shard's files alone (a small run builds them in the driver), so the driver holds
a counter per status, never rows. A file already written is not built again on a resumed run.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stage import DROP_KIND, DROP_REASON
from pipeline.stats import StageStats
from pipeline.storage import Storage

FOLDER = "decisions"
LEGACY_FILE = "decisions.parquet"  # one file for the whole run, written by earlier versions
STEP = "decisions"
# Up to this many files, the driver writes them itself: ~25 ms per 1,000-row shard there, while the
# first Ray tasks after the stages cost ~2.5 s of worker start (bench/small_steps.py, docs/SCALING.md).
DRIVER_MAX_SHARDS = 16
IN_FLIGHT = 256  # tasks submitted at once: the driver's references stay bounded at any shard count
COLUMNS = ["row_id", "key", "url", "caption", "status", "stage", "reason", "duplicate_of"]
SCHEMA = pa.schema([("row_id", pa.int64()), ("key", pa.string()), ("url", pa.string()),
                    ("caption", pa.string()), ("status", pa.string()), ("stage", pa.string()),
                    ("reason", pa.string()), ("duplicate_of", pa.string())])


def _frame(table: pa.Table, status: pa.Array | str, stage: str, reason: pa.Array | None) -> pa.Table:
    n = table.num_rows

    def col(name: str, kind: pa.DataType) -> pa.Array:
        if name in table.column_names:
            return table[name].cast(kind)
        return pa.nulls(n, kind)

    status_arr = pa.array([status] * n, pa.string()) if isinstance(status, str) else status
    dup = col("duplicate_of", pa.string())
    if "duplicate_of_row" in table.column_names:  # input-stage duplicates name a row, not a key
        dup = pc.cast(table["duplicate_of_row"], pa.string())
    return pa.table([col("row_id", pa.int64()), col("key", pa.string()), col("url", pa.string()),
                     col("caption", pa.string()), status_arr, pa.array([stage] * n, pa.string()),
                     reason if reason is not None else pa.nulls(n, pa.string()), dup], schema=SCHEMA)


def shard_decisions(storage: Storage, stages: list[str], shard: str) -> pa.Table:
    """The decisions of input shard `shard`, from each stage's file of that shard, by row_id."""
    from pipeline.download import download_decisions

    parts = []
    for stage in stages:
        table = storage.read_parquet(f"{stage}/{shard}.parquet")
        if stage == "download":
            table = download_decisions(table)
        removed = table.filter(pc.is_valid(table[DROP_REASON]))
        if removed.num_rows:
            # Only the download fails rows (could not fetch); later stages decide.
            status = pc.if_else(pc.equal(removed[DROP_KIND], "failed"), "failed_download", "dropped") \
                if stage == "download" else "dropped"
            parts.append(_frame(removed, status, stage, removed[DROP_REASON].combine_chunks()))
        if stage == stages[-1]:
            parts.append(_frame(table.filter(pc.is_null(table[DROP_REASON])), "kept", stage, None))
    return pa.concat_tables(parts).sort_by("row_id") if parts else SCHEMA.empty_table()


def rejected_decisions(storage: Storage, part: str) -> pa.Table:
    """The decisions of `input/rejected/<part>.parquet`: rows refused before download."""
    table = storage.read_parquet(f"input/rejected/{part}.parquet")
    return _frame(table, "dropped", "input", table[DROP_REASON].cast(pa.string()).combine_chunks())


def write_shard_decisions(output: str, stages: list[str], name: str) -> dict[str, int]:
    """Write `decisions/<name>.parquet` unless it exists; returns its rows per status.
    `name` is an input shard (`00012`) or a rejected part (`rejected-00000`)."""
    storage = Storage(output)
    rel = f"{FOLDER}/{name}.parquet"
    if storage.exists(rel):  # written atomically: present means complete
        table = storage.read_parquet(rel, columns=["status"])
    else:
        table = (rejected_decisions(storage, name.removeprefix("rejected-")) if name.startswith("rejected-")
                 else shard_decisions(storage, stages, name))
        storage.write_parquet(rel, table)
    return dict(Counter(table["status"].to_pylist()))


def write_decisions(storage: Storage, stages: list[str], shards: list[str],
                    progress: Callable[[str], None] = print, driver_max_shards: int = DRIVER_MAX_SHARDS
                    ) -> StageStats:
    """Write `decisions/` for a run whose stages are complete; `stages` are the per-shard stage
    folders in pipeline order. Returns the step's statistics: rows per status as counters."""
    start = time.perf_counter()
    names = list(shards) + [f"rejected-{rel.rsplit('/', 1)[1].removesuffix('.parquet')}"
                            for rel in storage.glob("input/rejected/*.parquet")]
    storage.makedirs(FOLDER)
    storage.clean_temporaries(FOLDER)
    statuses: Counter = Counter()
    if not names:  # an empty input: one empty file keeps the folder a readable dataset
        storage.write_parquet(f"{FOLDER}/00000.parquet", SCHEMA.empty_table())
    elif len(names) <= driver_max_shards:
        for name in names:
            statuses.update(write_shard_decisions(storage.url, stages, name))
    else:
        statuses = _write_on_ray(storage.url, stages, names)
    rows = sum(statuses.values())
    stats = StageStats(stage=STEP, rows_in=rows, rows_out=rows, counters=statuses, shards=len(names),
                       seconds=time.perf_counter() - start)
    where = "in the driver" if len(names) <= driver_max_shards else "by Ray tasks"
    progress(f"[decisions] {rows} rows in {FOLDER}/ ({len(names)} file(s), {where}) in {stats.seconds:.1f} s")
    return stats


def _write_on_ray(output: str, stages: list[str], names: list[str]) -> Counter:
    import ray

    task = ray.remote(num_cpus=1)(write_shard_decisions)
    statuses: Counter = Counter()
    pending: list = []
    for name in names:
        if len(pending) >= IN_FLIGHT:
            done, pending = ray.wait(pending, num_returns=1)
            statuses.update(ray.get(done[0]))
        pending.append(task.remote(output, stages, name))
    for counts in ray.get(pending):
        statuses.update(counts)
    return statuses


def decision_files(storage: Storage) -> list[str]:
    """The decision files of a finished run, in order (a run of an earlier version: its one file)."""
    if storage.exists(FOLDER):
        return storage.glob(f"{FOLDER}/*.parquet")
    return [LEGACY_FILE] if storage.exists(LEGACY_FILE) else []
