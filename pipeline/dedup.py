"""Global duplicate search over many parquet shards with Ray Data.

Every row (of any shard, whatever worker reads it) is exploded into one record per multi-index
table; records are grouped by Ray's shuffle (``groupby(...).map_groups(...)``), so all rows that
share a bucket meet in one call, pairs are verified by exact Hamming distance there, and only the
small verified edge list comes back to the driver for the union-find. Exact sha256 duplicates are
grouped the same way.

A map_groups call costs a Python call, so records are not grouped by bucket (millions of tiny
groups) but by a hash of the bucket into ``n_groups`` partitions of about ``records_per_group``
records; inside a partition the buckets are separated with one vectorised sort
(:func:`filters.dedup.bucket_pairs`). The result equals :func:`filters.dedup.find_duplicates` on
the same rows: same tables, same capping order (ascending hash), same counters.

Which rows drop, and why (column ``dup_reason``):

* Rows connected by verified pairs form a cluster. Its representative is the row with the largest
  original pixel area (original_width * original_height), ties broken by the smallest key; it is
  kept (``duplicate_of`` null, ``dup_reason`` null). Every row gets ``cluster_id`` = the
  representative's key and ``cluster_size``; singletons are their own cluster of size 1.
* Every other member is dropped with ``duplicate_of`` = the representative's key and the reason
  ``duplicate_caption_and_image`` when its normalised caption (filters.caption.normalize_caption)
  equals the representative's and is not empty; otherwise ``exact_duplicate`` when its sha256
  equals the representative's; otherwise ``near_duplicate``. The caption rule therefore never
  keeps or drops more rows than the image clusters do; it names the drops whose text repeats too.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset  # noqa: F401 (pa.dataset)
import pyarrow.parquet as pq

from filters.caption import normalize_caption
from filters.dedup import (DedupConfig, PairCounters, bucket_pairs, exact_pairs, hex_prefix, near_pairs,
                           plan_tables, resolve_clusters, table_keys)

COLUMNS = ["key", "sha256", "phash", "original_width", "original_height", "caption"]
_COUNTERS = ("candidate_pairs", "verified_pairs", "capped_buckets", "capped_items")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads buckets evenly over the groups


def _group_of(values: np.ndarray, n_groups: int) -> np.ndarray:
    mixed = values.astype(np.uint64) * _MIX
    return ((mixed >> np.uint64(32)) % np.uint64(n_groups)).astype(np.int64)


def _explode(batch: dict[str, np.ndarray], threshold: int, n_items: int, max_tables: int | None,
             n_groups: int, first_table: int = 0, last_table: int | None = None) -> dict[str, np.ndarray]:
    all_specs = plan_tables(threshold, n_items, max_tables)
    table_bits = max(1, (len(all_specs) - 1).bit_length())
    # One shift for all tables: keys of different widths must not collide across tables.
    key_bits = max(spec.key_bits for spec in all_specs)
    if key_bits + table_bits > 63:
        raise ValueError("bucket key and table id do not fit one int64")
    specs = all_specs[first_table:last_table]
    phash = batch["phash"].astype(np.int64)
    buckets = [(np.int64(spec.table_id) << np.int64(key_bits)) | table_keys(phash, spec).astype(np.int64)
               for spec in specs]
    bucket = np.concatenate(buckets) if buckets else np.empty(0, np.int64)
    return {"group": _group_of(bucket, n_groups), "bucket": bucket,
            "table": np.repeat(np.array([spec.table_id for spec in specs], dtype=np.int64), phash.size),
            "key": np.tile(batch["key"].astype(str), len(specs)), "phash": np.tile(phash, len(specs))}


def _edges_table(first: list[str], second: list[str], counters: PairCounters) -> pa.Table:
    # The counters ride on one extra row with null keys, so they add up through Ray like data.
    values = counters.to_dict()
    size = len(first) + 1
    columns = {"key_a": pa.array(list(first) + [None], pa.string()),
               "key_b": pa.array(list(second) + [None], pa.string())}
    for name in _COUNTERS:
        columns[name] = pa.array([0] * (size - 1) + [values[name]], pa.int64())
    return pa.table(columns)


def _near_edges(group: dict[str, np.ndarray], threshold: int, cap: int) -> pa.Table:
    keys, items = np.unique(group["key"].astype(str), return_inverse=True)
    first, second, chain_first, chain_second, chain_bucket, counters = bucket_pairs(
        group["bucket"], items, group["phash"], threshold, cap)
    # Equal hashes meet in every table; linking them once (table 0) is enough.
    chained = _table_of_bucket(group, chain_bucket) == 0
    first = np.concatenate((first, chain_first[chained]))
    second = np.concatenate((second, chain_second[chained]))
    return _edges_table(keys[first].tolist(), keys[second].tolist(), counters)


def _table_of_bucket(group: dict[str, np.ndarray], buckets: np.ndarray) -> np.ndarray:
    order = np.argsort(group["bucket"], kind="stable")
    positions = np.searchsorted(group["bucket"][order], buckets)
    return group["table"][order][positions] if buckets.size else np.empty(0, np.int64)


def _exact_edges(group: dict[str, np.ndarray]) -> pa.Table:
    keys = group["key"].astype(str)
    first, second = exact_pairs(group["sha256"].astype(str))
    return _edges_table(keys[first].tolist(), keys[second].tolist(), PairCounters())


def _read_rows(parquet_paths: list[str]):
    import ray

    schema = pq.read_schema(parquet_paths[0])
    has_drop_reason = "drop_reason" in schema.names
    columns = COLUMNS + (["drop_reason"] if has_drop_reason else [])
    rows = ray.data.read_parquet(parquet_paths).select_columns(columns)
    if has_drop_reason:
        rows = rows.map_batches(lambda batch: batch.filter(pc.is_null(batch["drop_reason"])),
                                batch_format="pyarrow")
    return rows.materialize()


def empty_result() -> tuple[pa.Table, dict[str, int]]:
    """The search's result over zero rows: no cluster rows, every counter 0."""
    empty = pa.table({"key": pa.array([], pa.string()), "duplicate_of": pa.array([], pa.string()),
                      "cluster_id": pa.array([], pa.string()), "cluster_size": pa.array([], pa.int64()),
                      "dup_reason": pa.array([], pa.string())})
    return empty, {name: 0 for name in (*_COUNTERS, "rows", "clusters", "duplicates")}


def _kept_rows(parquet_paths: list[str]) -> tuple[pa.dataset.Dataset, pc.Expression | None]:
    """The shards as one pyarrow dataset, and the filter for the rows still kept (drop_reason null)."""
    dataset = pa.dataset.dataset(parquet_paths, format="parquet")
    return dataset, pc.field("drop_reason").is_null() if "drop_reason" in dataset.schema.names else None


def count_kept_rows(parquet_paths: list[str]) -> int:
    """Rows still kept over all shards, from the Parquet files (one column read)."""
    dataset, kept = _kept_rows(parquet_paths)
    return dataset.count_rows(filter=kept)


def find_duplicates_in_driver(parquet_paths: list[str], config: DedupConfig, threads: int = 2
                              ) -> tuple[pa.Table, dict[str, int]]:
    """The same result as :func:`find_duplicates_ray`, searched in this process.

    For corpora whose rows fit one machine (~260 bytes a row at the search's peak at 10M, plus the
    row table; docs/BENCHMARKS.md) this is far cheaper than the Ray shuffle (26-31x at 100k-1M
    rows, measured on one machine): the compiled single-machine search
    (:func:`filters.dedup.near_pairs`) over the same tables, no records in flight.
    """
    dataset, kept = _kept_rows(parquet_paths)
    table = dataset.to_table(columns=COLUMNS, filter=kept)
    if table.num_rows == 0:
        return empty_result()
    phash = table["phash"].to_numpy(zero_copy_only=False).astype(np.int64)
    first, second, counters = near_pairs(phash, config, threads=threads)
    exact_first, exact_second = exact_pairs(np.asarray(table["sha256"].to_pylist(), dtype=object))
    return _assemble(table, np.concatenate((first, exact_first)), np.concatenate((second, exact_second)),
                     counters.to_dict())


def find_duplicates_ray(parquet_paths: list[str], config: DedupConfig, records_per_group: int = 1 << 20,
                        tables_per_shuffle: int | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Duplicate clusters over the kept rows (``drop_reason`` null) of all ``parquet_paths``.

    ``tables_per_shuffle`` bounds the shuffle: the multi-index tables are searched in waves of that
    many tables (None: all in one shuffle), so the records in flight are rows x tables_per_shuffle
    instead of rows x all tables. The result is the same.

    Returns a table ``key, duplicate_of, cluster_id, cluster_size, dup_reason`` with one row per
    input key (in the order Ray read them) and the counters ``candidate_pairs``,
    ``verified_pairs``, ``capped_buckets``, ``capped_items``, ``rows``, ``clusters``,
    ``duplicates``. Rules for the columns: see the module docstring.
    """
    import ray

    rows = _read_rows(parquet_paths)
    table = pa.concat_tables(ray.get(rows.to_arrow_refs())) if rows.count() else None
    if table is None or table.num_rows == 0:
        return empty_result()
    n_items = table.num_rows
    n_tables = len(plan_tables(config.hamming_threshold, n_items, config.tables))
    wave = n_tables if tables_per_shuffle is None else max(1, min(tables_per_shuffle, n_tables))
    near_parts: list = []
    for first_table in range(0, n_tables, wave):
        n_groups = max(1, math.ceil(n_items * wave / records_per_group))
        records = rows.select_columns(["key", "phash"]).map_batches(
            _explode, batch_format="numpy", fn_kwargs={
                "threshold": config.hamming_threshold, "n_items": n_items, "max_tables": config.tables,
                "n_groups": n_groups, "first_table": first_table, "last_table": first_table + wave})
        # Few shuffle partitions: each one is an aggregator, and the groups are already coarse.
        near = records.groupby("group", num_partitions=min(n_groups, 64)).map_groups(
            _near_edges, batch_format="numpy",
            fn_kwargs={"threshold": config.hamming_threshold, "cap": config.bucket_cap})
        near_parts.extend(ray.get(near.to_arrow_refs()))
    exact_groups = max(1, math.ceil(n_items / records_per_group))
    exact = rows.select_columns(["key", "sha256"]).map_batches(
        lambda batch: {**batch, "group": _group_of(_sha_prefix(batch["sha256"]), exact_groups)},
        batch_format="numpy").groupby("group", num_partitions=min(exact_groups, 64)).map_groups(
            _exact_edges, batch_format="numpy")
    edges = pa.concat_tables(near_parts + ray.get(exact.to_arrow_refs()))
    counters = {name: int(pc.sum(edges[name]).as_py() or 0) for name in _COUNTERS}
    edges = edges.filter(pc.is_valid(edges["key_a"]))
    keys = np.asarray(table["key"].to_numpy(zero_copy_only=False)).astype(str)
    order = np.argsort(keys)
    first = order[np.searchsorted(keys[order], edges["key_a"].to_numpy(zero_copy_only=False).astype(str))]
    second = order[np.searchsorted(keys[order], edges["key_b"].to_numpy(zero_copy_only=False).astype(str))]
    return _assemble(table, first, second, counters)


def _sha_prefix(sha256: np.ndarray) -> np.ndarray:
    prefix = hex_prefix(sha256)
    if prefix is None:  # not hex: a stable checksum (Python's hash() differs between workers)
        prefix = np.array([zlib.crc32(str(value).encode()) for value in sha256], np.uint64)
    return prefix


def _assemble(table: pa.Table, first: np.ndarray, second: np.ndarray, counters: dict[str, int]
              ) -> tuple[pa.Table, dict[str, int]]:
    """Clusters from the verified edges (row positions in ``table``), as the output table."""
    keys = np.asarray(table["key"].to_numpy(zero_copy_only=False)).astype(str)
    width = table["original_width"].fill_null(0).to_numpy().astype(np.int64)
    height = table["original_height"].fill_null(0).to_numpy().astype(np.int64)
    captions = np.array([normalize_caption(text) for text in table["caption"].to_pylist()], dtype=object)
    result = resolve_clusters(keys, width * height, first, second,
                              np.asarray(table["sha256"].to_pylist(), dtype=object), captions, counters)
    output = pa.table({
        "key": pa.array(keys.tolist(), pa.string()),
        "duplicate_of": pa.array(result.duplicate_of.tolist(), pa.string()),
        "cluster_id": pa.array(result.cluster_id.tolist(), pa.string()),
        "cluster_size": pa.array(result.cluster_size, pa.int64()),
        "dup_reason": pa.array(result.dup_reason.tolist(), pa.string()),
    })
    dropped = int((result.representative != np.arange(keys.size)).sum())
    clusters = int(np.unique(result.representative).size)
    return output, {**counters, "rows": int(keys.size), "clusters": clusters, "duplicates": dropped}
