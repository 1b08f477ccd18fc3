"""The final shards' deterministic shuffle, without a global sort: map and reduce work per task.

Every kept row gets a seeded 64-bit hash of its key (`shuffle_keys`). Final shard j of N holds the
rows whose hash lies in the j-th of N equal ranges of the 64-bit space, ordered by hash (then key).
So a final shard's content depends only on the rows, the seed and N, never on how the work was
split: a map task partitions a group of stage shards by range into one part per reduce task
(`_shuffle/BBBBB/GGGGG.parquet`); a reduce task reads its parts, cuts its consecutive final
shards and writes each one's tar and Parquet, reading image bytes from the download tars by offset.
Sizes vary around the mean like a binomial count (about ±1% at 10,000 rows a shard).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa

from pipeline.records import read_tar_index
from pipeline.schema import TAR_OFFSET, TAR_SIZE
from pipeline.stage import DROP_KIND, DROP_REASON, kept_rows, shard_name
from pipeline.storage import Storage

FOLDER = "shards"  # WebDataset tars, sizes.json, manifest.json, tokenizer.model, _NNNNN.done markers
PARQUET_FOLDER = "shards_parquet"  # the tars' rows without image bytes: a plain Parquet dataset
PARTS = "_shuffle"  # map outputs and the plan; removed once every final shard is written
KEY = "shuffle_key"
INTERNAL_COLUMNS = {DROP_REASON, DROP_KIND, "tar_offset", "tar_size", KEY, "image", "status", "error_message"}


def shuffle_keys(keys: list[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash per key: sorting by it shuffles, the same way on every run."""
    out = np.empty(len(keys), np.uint64)
    prefix = f"{seed}:".encode()
    for i, key in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + key.encode(), digest_size=8).digest(), "little")
    return out


def final_index(hashes: np.ndarray, n_final: int) -> np.ndarray:
    """The final shard of each hash: j such that j * 2**64 / N <= hash < (j + 1) * 2**64 / N."""
    starts = np.array([(j << 64) // n_final for j in range(1, n_final)], np.uint64)
    return np.searchsorted(starts, hashes, side="right").astype(np.int64)


def done_marker(name: str) -> str:
    # A leading underscore: pyarrow, pandas and Spark skip such files when reading a folder.
    return f"{FOLDER}/_{name}.done"


def keyed_rows(storage: Storage, stage: str, shard: str, seed: int) -> pa.Table:
    """The kept rows of `<stage>/<shard>.parquet` with their shuffle key."""
    table = kept_rows(storage.read_parquet(f"{stage}/{shard}.parquet"))  # download/ has `status` only
    if TAR_OFFSET not in table.column_names:  # no stage after download read the tar: index its headers
        index = read_tar_index(storage, shard)
        places = [index.get(key) for key in table["key"].to_pylist()]
        table = (table.append_column(TAR_OFFSET, pa.array([p[0] if p else None for p in places], pa.int64()))
                 .append_column(TAR_SIZE, pa.array([p[1] if p else None for p in places], pa.int64())))
    return table.append_column(KEY, pa.array(shuffle_keys(table["key"].to_pylist(), seed), pa.uint64()))


def _concat(tables: list[pa.Table]) -> pa.Table:
    # A shard whose column was all null may have typed it null; permissive promotion unifies.
    return pa.concat_tables(tables, promote_options="permissive")


def map_group(output: str, stage: str, group: int, sources: list[str], seed: int, n_final: int,
              bucket_starts: list[int], buckets: list[int]) -> int:
    """Partition the kept rows of `sources` into one part per reduce task in `buckets`, then the
    group's marker (which names the buckets written). Returns the rows read."""
    storage = Storage(output)
    rows = _concat([keyed_rows(storage, stage, s, seed) for s in sources])
    bucket = np.searchsorted(np.array(bucket_starts), final_index(rows[KEY].to_numpy(), n_final), side="right") - 1
    order = np.argsort(bucket, kind="stable")
    rows, bucket = rows.take(pa.array(order)), bucket[order]
    for b in buckets:
        lo, hi = np.searchsorted(bucket, [b, b + 1])
        storage.write_parquet(f"{PARTS}/{shard_name(b)}/{shard_name(group)}.parquet", rows.slice(lo, hi - lo))
    storage.write_json(f"{PARTS}/_map-{shard_name(group)}.done", {"buckets": sorted(buckets)})
    return rows.num_rows


def reduce_bucket(output: str, bucket: int, finals: list[int], n_final: int, encode_format: str,
                  direct: tuple[str, list[str], int] | None = None) -> dict[str, int]:
    """Write the final shards `finals` (of reduce task `bucket`, not yet done); returns their
    sample counts. Rows come from the task's parts, or with `direct` = (stage, shards, seed) from
    the stage shards themselves (a run with one map group needs no parts)."""
    storage = Storage(output)
    if direct:
        stage, shards, seed = direct
        tables = [keyed_rows(storage, stage, s, seed) for s in shards]
    else:
        tables = [storage.read_parquet(rel) for rel in storage.glob(f"{PARTS}/{shard_name(bucket)}/*.parquet")]
    if not tables:
        raise FileNotFoundError(f"{storage.full_url(PARTS)}: no part of reduce task {bucket}")
    # One sort: the ranges are monotonic in the hash, so each final shard is a contiguous slice.
    rows = _concat(tables).sort_by([(KEY, "ascending"), ("key", "ascending")])
    index = final_index(rows[KEY].to_numpy(), n_final)
    counts = {}
    for j in finals:
        lo, hi = np.searchsorted(index, [j, j + 1])
        counts[shard_name(j)] = write_shard(storage, shard_name(j), rows.slice(lo, hi - lo), encode_format)
    return counts


def _sample_json(row: dict) -> bytes:
    meta = {k: v for k, v in row.items() if k not in INTERNAL_COLUMNS}
    return json.dumps(meta, ensure_ascii=False, default=str).encode()


def write_shard(storage: Storage, name: str, rows: pa.Table, encode_format: str = "jpg") -> int:
    """Write `shards/<name>.tar` and `shards_parquet/<name>.parquet` for `rows` (in order), then
    the marker `shards/_<name>.done`."""
    records = rows.to_pylist()
    images: dict[str, bytes] = {}
    by_source: dict[str, list[dict]] = {}
    for row in records:
        by_source.setdefault(row["key"][:5], []).append(row)
    for source, items in by_source.items():  # one open per source tar, reads in file order
        with storage.fs.open(storage.path(f"download/{source}.tar"), "rb") as handle:
            for row in sorted(items, key=lambda r: r["tar_offset"]):
                handle.seek(row["tar_offset"])
                images[row["key"]] = handle.read(row["tar_size"])
    with storage.atomic_open(f"{FOLDER}/{name}.tar", "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for row in records:
                for ext, data in ((encode_format, images[row["key"]]),
                                  ("txt", (row["caption"] or "").encode()), ("json", _sample_json(row))):
                    info = tarfile.TarInfo(f"{row['key']}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    archive.addfile(info, io.BytesIO(data))
    keep = [c for c in rows.column_names if c not in INTERNAL_COLUMNS]
    storage.write_parquet(f"{PARQUET_FOLDER}/{name}.parquet", rows.select(keep))
    storage.write_json(done_marker(name), {"samples": len(records)})
    return len(records)
