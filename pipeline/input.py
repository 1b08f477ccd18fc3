"""The `input` stage: read a URL list, give every row a `row_id`, refuse what cannot be fetched,
collapse exact duplicate rows, and cut the rest into download shards.

Runs on the driver in two streaming passes, so memory is 17 bytes per input row (a 128-bit row hash
and a status code), not the rows themselves.

What the input may hold, and how files are read: `pipeline/input_read.py`.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from filters.url import url_reason
from filters.web.address import AddressPolicy
from pipeline.config import RunConfig
from pipeline.input_read import ColumnTypes, iter_input
from pipeline.stage import shard_name
from pipeline.stats import StageStats
from pipeline.storage import Storage

log = logging.getLogger(__name__)

STAGE = "input"
REJECTED_PART_ROWS = 1_000_000
REASON_CODES = ["", "empty_url", "malformed_url", "unsupported_scheme", "blocked_address",
                "duplicate_row"]
_CODE = {reason: i for i, reason in enumerate(REASON_CODES)}


def _row_hashes(table: pa.Table) -> np.ndarray:
    joined = (pd.Series(table["url"].to_pylist(), dtype=object).fillna("\x01") + "\x00"
              + pd.Series(table["caption"].to_pylist(), dtype=object).fillna("\x01")).to_numpy()
    first = pd.util.hash_array(joined, hash_key="filip-corpus-h1a")
    second = pd.util.hash_array(joined, hash_key="filip-corpus-h2b")
    return np.stack([first, second], axis=1)


def prepare_input(config: RunConfig, storage: Storage,
                  policy: AddressPolicy | None = None) -> tuple[list[str], StageStats]:
    """Write `input/NNNNN.parquet` shards and `input/rejected/*.parquet`; resumable as a whole.
    `policy`: the download's address policy, so a URL whose host is an address it refuses is
    refused here already (the download checks again at connect time)."""
    if storage.exists(f"{STAGE}/.done"):
        stats = StageStats.from_dict(storage.read_json(f"{STAGE}/stats.json"))
        return storage.read_json(f"{STAGE}/shards.json"), stats
    storage.remove(STAGE, recursive=True)
    start = time.perf_counter()

    # Pass 1: a reason code per row, and the first row of every (url, caption) pair.
    codes, hashes = [], []
    column_types = ColumnTypes()
    for path, table in iter_input(config):
        column_types.learn(path, table)
        reasons = [url_reason(u, policy) for u in table["url"].to_pylist()]
        codes.append(np.array([_CODE[r or ""] for r in reasons], dtype=np.uint8))
        hashes.append(_row_hashes(table))
    code = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
    row_hash = np.concatenate(hashes) if hashes else np.zeros((0, 2), np.uint64)
    n_rows = len(code)
    first_of = np.arange(n_rows, dtype=np.int64)
    valid = np.flatnonzero(code == 0)
    if len(valid):
        keys = np.ascontiguousarray(row_hash[valid]).view([("a", np.uint64), ("b", np.uint64)]).ravel()
        _, first_pos, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first_of[valid] = valid[first_pos[inverse.ravel()]]
        code[valid[first_of[valid] != valid]] = _CODE["duplicate_row"]

    # Pass 2: write the kept rows in shards and the rejected rows with their reasons.
    shards: list[str] = []
    buffer: list[pa.Table] = []
    buffered = 0
    rejected: list[pa.Table] = []
    rejected_rows = 0
    parts = 0
    offset = 0

    def flush_shard(tables: list[pa.Table]) -> None:
        name = shard_name(len(shards))
        storage.write_parquet(f"{STAGE}/{name}.parquet", pa.concat_tables(tables, promote_options="permissive"))
        shards.append(name)

    def flush_rejected() -> None:
        nonlocal parts, rejected, rejected_rows
        if rejected:
            storage.write_parquet(f"{STAGE}/rejected/{parts:05d}.parquet",
                                  pa.concat_tables(rejected, promote_options="permissive"))
            parts += 1
            rejected, rejected_rows = [], 0

    for path, table in iter_input(config):
        table = column_types.apply(path, table)
        n = table.num_rows
        ids = np.arange(offset, offset + n, dtype=np.int64)
        table = table.add_column(0, "row_id", pa.array(ids))
        batch_code = code[offset:offset + n]
        keep = batch_code == 0
        if (~keep).any():
            bad = table.filter(pa.array(~keep)).select(["row_id", "url", "caption"])
            bad_codes = batch_code[~keep]
            bad = bad.append_column("drop_reason", pa.array([REASON_CODES[c] for c in bad_codes]))
            dup_of = np.where(bad_codes == _CODE["duplicate_row"], first_of[offset:offset + n][~keep], -1)
            bad = bad.append_column("duplicate_of_row",
                                    pa.array(dup_of, mask=dup_of < 0, type=pa.int64()))
            rejected.append(bad)
            rejected_rows += bad.num_rows
            if rejected_rows >= REJECTED_PART_ROWS:
                flush_rejected()
        kept = table.filter(pa.array(keep))
        while kept.num_rows:
            take = min(config.shard_size - buffered, kept.num_rows)
            buffer.append(kept.slice(0, take))
            buffered += take
            kept = kept.slice(take)
            if buffered == config.shard_size:
                flush_shard(buffer)
                buffer, buffered = [], 0
        offset += n
    if buffer:
        flush_shard(buffer)
    flush_rejected()

    stats = StageStats(stage=STAGE, rows_in=n_rows, shards=len(shards))
    for value, reason in enumerate(REASON_CODES):
        count = int((code == value).sum())
        if value == 0:
            stats.rows_out = count
        elif count:
            stats.dropped[reason] = count
    stats.seconds = time.perf_counter() - start
    storage.write_json(f"{STAGE}/shards.json", shards)
    storage.write_json(f"{STAGE}/stats.json", stats.to_dict())
    storage.write_text(f"{STAGE}/.done", "")
    log.info("input: %d rows, %d kept in %d shards", n_rows, stats.rows_out, len(shards))
    return shards, stats
