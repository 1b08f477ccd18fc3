"""The `input` stage: read a URL list, give every row a `row_id`, refuse what cannot be fetched,
collapse exact duplicate rows, and cut the rest into download shards.

Runs on the driver in two streaming passes, so memory is 17 bytes per input row (a 128-bit row hash
and a status code), not the rows themselves.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from filters.url import url_reason
from filters.web.address import AddressPolicy
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.stage import shard_name
from pipeline.stats import StageStats
from pipeline.storage import Storage

log = logging.getLogger(__name__)

STAGE = "input"
REJECTED_PART_ROWS = 1_000_000
# Columns the pipeline writes itself; an input column with one of these names is carried as
# `source_<name>` so the user's data is never overwritten.
RESERVED_COLUMNS = {
    "row_id", "key", "url", "caption", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "md5", "sha256", "sha512", "phash",
    "unsafe_score", "duplicate_of", "cluster_id", "cluster_size", "caption_bt_de",
    "caption_bt_ru", "drop_reason", "drop_kind", "tar_offset", "tar_size", "image",
    "final_url", "redirects", "attempts",
}
REASON_CODES = ["", "empty_url", "malformed_url", "unsupported_scheme", "blocked_address",
                "duplicate_row"]
_CODE = {reason: i for i, reason in enumerate(REASON_CODES)}


class InputError(UserError, ValueError):
    """The URL list cannot be used: the message names the file and what is wrong."""


def resolve_input_files(spec: str) -> list[str]:
    """A file, a folder (its files, sorted) or a glob."""
    fs, path = fsspec.core.url_to_fs(spec)
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not Path(p).name.startswith((".", "_")))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"{spec}: input URL list not found")
    if not files:
        raise InputError(f"{spec}: no input files found")
    return [fs.unstrip_protocol(f) if fs.protocol not in ("file", ("file", "local")) else f for f in files]


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".json", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return fmt
    raise InputError(f"{path}: cannot tell the format from the name; set run.input_format")


def _read_batches(path: str, fmt: str, url_col: str, caption_col: str) -> Iterator[pa.RecordBatch]:
    fs, fpath = fsspec.core.url_to_fs(path)
    text_types = {url_col: pa.string(), caption_col: pa.string()}
    try:
        if fmt == "parquet":
            with fs.open(fpath, "rb") as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65536)
        elif fmt in ("csv", "tsv"):
            with fs.open(fpath, "rb", compression="infer") as handle:
                reader = pacsv.open_csv(
                    handle,
                    parse_options=pacsv.ParseOptions(delimiter="," if fmt == "csv" else "\t",
                                                     newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(column_types=text_types,
                                                         strings_can_be_null=True),
                    read_options=pacsv.ReadOptions(block_size=1 << 24),
                )
                yield from reader
        else:
            with fs.open(fpath, "rb", compression="infer") as handle:
                table = pajson.read_json(handle)
            yield from table.to_batches(max_chunksize=65536)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: cannot read as {fmt}: {err}") from None


def iter_input(config: RunConfig) -> Iterator[tuple[str, pa.Table]]:
    """(file, batch) with `url` and `caption` columns as strings and extra columns renamed if reserved."""
    for path in resolve_input_files(config.input):
        fmt = detect_format(path, config.input_format)
        for batch in _read_batches(path, fmt, config.url_column, config.caption_column):
            table = pa.Table.from_batches([batch])
            missing = [c for c in (config.url_column, config.caption_column) if c not in table.column_names]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {missing} (found: {table.column_names}); set "
                    f"run.url_column / run.caption_column")
            names = []
            for name in table.column_names:
                if name == config.url_column:
                    names.append("url")
                elif name == config.caption_column:
                    names.append("caption")
                elif name in RESERVED_COLUMNS:
                    names.append(f"source_{name}")
                else:
                    names.append(name)
            table = table.rename_columns(names)
            for col in ("url", "caption"):
                if table[col].type != pa.string():
                    table = table.set_column(table.schema.get_field_index(col), col,
                                             table[col].cast(pa.string()))
            yield path, table


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
    for _, table in iter_input(config):
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

    for _, table in iter_input(config):
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
