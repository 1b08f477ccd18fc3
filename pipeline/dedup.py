"""Global duplicate search over many parquet shards: distributed on Ray, or in this process.

The distributed search (:func:`find_duplicates_distributed`) moves no rows through the driver and
shuffles no records: Ray tasks (steps in ``pipeline/dedup_tasks.py``) read groups of shards and put
each kept row's pHash in the object store once (8 bytes, plus its 8-byte row number while sorting);
range tasks sort the distinct hashes; each search task maps that one sorted array from the object
store (no copy) and searches its share of the multi-index tables (``filters.dedup.plan_tables``)
with the compiled single-machine kernel, returning only its verified pairs; exact sha256 copies
are found per hash part of the sha256 values; one task joins all pairs in a union-find, and the
group tasks write each shard's verdict. It returns exactly what the in-driver search
(:func:`find_duplicates_in_driver`) returns: the same tables, capping order and counters.

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

import functools
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from filters.caption import normalize_caption
from filters.dedup import (
    DedupConfig,
    exact_pairs,
    near_pairs,
    plan_tables,
    resolve_clusters,
)
from pipeline import dedup_tasks
from pipeline.dedup_tasks import read_kept

COLUMNS = ["key", "sha256", "phash", "original_width", "original_height", "caption"]
_COUNTERS = ("candidate_pairs", "verified_pairs", "capped_buckets", "capped_items")
# Sizes of the distributed search's pieces: a group task reads about this many rows (fewer, larger
# groups mean fewer objects: each group makes 2 per part); a sort part holds about this many.
ROWS_PER_GROUP = 1_000_000
ROWS_PER_PART = 4_000_000


def empty_result() -> tuple[pa.Table, dict[str, int]]:
    """The search's result over zero rows: no cluster rows, every counter 0."""
    empty = pa.table({"key": pa.array([], pa.string()), "duplicate_of": pa.array([], pa.string()),
                      "cluster_id": pa.array([], pa.string()), "cluster_size": pa.array([], pa.int64()),
                      "dup_reason": pa.array([], pa.string())})
    return empty, {name: 0 for name in (*_COUNTERS, "rows", "clusters", "duplicates")}


def count_kept_rows(parquet_paths: list[str]) -> int:
    """Rows still kept over all shards, from the Parquet files (one column read)."""
    dataset, kept = dedup_tasks.kept_dataset(parquet_paths)
    return dataset.count_rows(filter=kept)


def find_duplicates_in_driver(parquet_paths: list[str], config: DedupConfig, threads: int = 2
                              ) -> tuple[pa.Table, dict[str, int]]:
    """The same result as :func:`find_duplicates_distributed`, searched in this process.

    Holds every kept row (~290 bytes a row at 10M, docs/SCALING.md): the compiled single-machine
    search (:func:`filters.dedup.near_pairs`) over the same tables, on ``threads`` threads.
    """
    table = read_kept(parquet_paths, COLUMNS)
    if table.num_rows == 0:
        return empty_result()
    phash = table["phash"].to_numpy(zero_copy_only=False).astype(np.int64)
    first, second, counters = near_pairs(phash, config, threads=threads)
    exact_first, exact_second = exact_pairs(np.asarray(table["sha256"].to_pylist(), dtype=object))
    return _assemble(table, np.concatenate((first, exact_first)), np.concatenate((second, exact_second)),
                     counters.to_dict())


@functools.cache
def _remote(function: Callable):
    """One Ray remote function per step (exported to the workers once), one CPU a task."""
    import ray

    return ray.remote(num_cpus=1)(function)


def _call(function: Callable, returns: int, *args):
    return _remote(function).options(num_returns=returns).remote(*args)


def finish_group(paths: list[str], offset: int, chosen: pa.Table, counts: np.ndarray,
                 write: Callable[[str, pa.Table], None] | None) -> pa.Table | None:
    """A group's verdict rows; with ``write``, written per shard (path, rows) here, on the worker."""
    table = dedup_tasks.group_result(paths, offset, chosen)
    if write is None:
        return table
    for path, start, count in zip(paths, np.cumsum(counts) - counts, counts):
        write(path, table.slice(int(start), int(count)))
    return None


def find_duplicates_distributed(parquet_paths: list[str], config: DedupConfig, tasks: int | None = None,
                                n_items: int | None = None,
                                write: Callable[[str, pa.Table], None] | None = None,
                                rows_per_group: int = ROWS_PER_GROUP, rows_per_part: int = ROWS_PER_PART
                                ) -> tuple[pa.Table | None, dict[str, int]]:
    """Duplicate clusters over the kept rows (``drop_reason`` null) of all ``parquet_paths``, on Ray.

    ``tasks``: search tasks (and sort / sha parts at most), default the cluster's CPUs.
    ``n_items``: the kept rows if already counted (sizes the pieces only). ``write(path, rows)``:
    called on the workers with each shard's verdict rows; then no table comes back (None).
    ``rows_per_group`` / ``rows_per_part``: rows a read task / a sort part aims at.

    Returns a table ``key, duplicate_of, cluster_id, cluster_size, dup_reason`` with one row per
    kept row, in the order of ``parquet_paths`` and their rows, and the counters
    ``candidate_pairs``, ``verified_pairs``, ``capped_buckets``, ``capped_items``, ``rows``,
    ``clusters``, ``duplicates``. Rules for the columns: see the module docstring.
    """
    import ray

    tasks = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_items = count_kept_rows(parquet_paths) if n_items is None and parquet_paths else (n_items or 0)
    parts = min(tasks, max(1, math.ceil(n_items / rows_per_part)))
    n_groups = max(1, min(len(parquet_paths), max(tasks, math.ceil(n_items / rows_per_group))))
    groups = [parquet_paths[len(parquet_paths) * g // n_groups:len(parquet_paths) * (g + 1) // n_groups]
              for g in range(n_groups)]
    reads = [_call(dedup_tasks.read_group, 1 + 2 * parts, group, parts) for group in groups]
    counts = ray.get([read[0] for read in reads])  # one small array per group: O(shards)
    group_rows = np.array([int(count.sum()) for count in counts], np.int64)
    offsets = np.cumsum(group_rows) - group_rows
    n_rows = int(group_rows.sum())
    if n_rows == 0:
        return empty_result()
    sorted_parts = [_call(dedup_tasks.sort_part, 2, offsets, *[read[1 + p] for read in reads])
                    for p in range(parts)]
    exact = [_call(dedup_tasks.exact_part, 1, offsets, *[read[1 + parts + p] for read in reads])
             for p in range(parts)]
    del reads  # the pieces are freed from the object store once the sort and sha tasks are done
    values, heads = _call(dedup_tasks.join_parts, 2, *[part[0] for part in sorted_parts])
    n_tables = len(plan_tables(config.hamming_threshold, n_rows, config.tables))
    shares = [list(range(first, n_tables, tasks)) for first in range(min(tasks, n_tables))]

    def search(once: bool) -> tuple[list, np.ndarray]:
        found = [_call(dedup_tasks.search_share, 2, values, heads, share, config, n_rows, once) for share in shares]
        return [pairs for pairs, _ in found], np.sum(ray.get([counters for _, counters in found]), axis=0)

    near, pair_counters = search(once=True)
    if pair_counters[2]:
        # A capped bucket may have left out a pair that its first table would have returned: as
        # the in-driver search does, every table then returns every pair it verifies.
        near, pair_counters = search(once=False)
    members = _call(dedup_tasks.join_clusters, 1, n_rows, *[part[1] for part in sorted_parts], *near, *exact)
    member_tables = [_call(dedup_tasks.group_members, 1, group, int(offset), members)
                     for group, offset in zip(groups, offsets)]
    chosen, chosen_counts = _call(dedup_tasks.choose, 2, *member_tables)
    finished = ray.get([_call(finish_group, 1, group, int(offset), chosen, count, write)
                        for group, offset, count in zip(groups, offsets, counts)])
    duplicates = int(ray.get(chosen_counts)[1])
    counters = {**dict(zip(_COUNTERS, (int(value) for value in pair_counters))),
                "rows": n_rows, "clusters": n_rows - duplicates, "duplicates": duplicates}
    return (None if write is not None else pa.concat_tables(finished)), counters


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
