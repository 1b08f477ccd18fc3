"""The steps of the distributed duplicate search, each one Ray task (Ray-free code; see pipeline/dedup.py).

A *group* is a run of consecutive shards read by one task; a row's global number is its position
in the concatenation of all groups' kept rows, the order the in-driver search reads them in. Hashes
travel as int64 arrays (8 bytes a row, plus an 8-byte row number where a task needs it), so a task
given them by reference maps them from the object store without a copy.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset

from filters.caption import normalize_caption
from filters.dedup import (
    DedupConfig,
    UnionFind,
    choose_representatives,
    distinct_hashes,
    duplicate_reasons,
    exact_pairs,
    hex_prefix,
    plan_tables,
    search_tables,
)

MEMBER_COLUMNS = ["key", "sha256", "original_width", "original_height", "caption"]
_SIGN = np.uint64(1 << 63)


def kept_dataset(paths: list[str]) -> tuple["pa.dataset.Dataset", "pc.Expression | None"]:
    """The Parquet files ``paths`` (local or on an object store) and the filter of their kept rows."""
    from pipeline.storage import arrow_filesystem

    filesystem, local_paths = arrow_filesystem(paths)
    dataset = pa.dataset.dataset(local_paths, format="parquet", filesystem=filesystem)
    kept = pc.field("drop_reason").is_null() if "drop_reason" in dataset.schema.names else None
    return dataset, kept


def read_kept(paths: list[str], columns: list[str]) -> pa.Table:
    """The kept rows (``drop_reason`` null) of ``paths``, in file and row order."""
    dataset, kept = kept_dataset(paths)
    return dataset.to_table(columns=columns, filter=kept)


def hash_part(phash: np.ndarray, parts: int) -> np.ndarray:
    """Range part of each signed hash: part p holds smaller hashes than part p + 1."""
    top = (np.asarray(phash, np.int64).view(np.uint64) ^ _SIGN) >> np.uint64(48)
    return ((top.astype(np.int64) * parts) >> 16).astype(np.int64)


def sha_part(sha256: np.ndarray, parts: int) -> np.ndarray:
    """Hash part of each sha256 string, from the value alone: equal strings in any group meet."""
    sha256 = np.asarray(sha256, dtype=object)
    prefix = hex_prefix(sha256) if sha256.size and None not in sha256 else None
    if prefix is None:  # not all hex: each value on its own (the same rule hex_prefix applies per value)
        prefix = np.array([_one_prefix(value) for value in sha256.tolist()], np.uint64)
    return ((prefix * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)).astype(np.int64) % parts


def _one_prefix(value: str | None) -> int:
    if value is None:
        return 0
    digits = value[:16]
    if len(digits) == 16 and all(c in "0123456789abcdefABCDEF" for c in digits):
        return int(digits, 16)
    return zlib.crc32(value.encode())  # stable across processes, unlike Python's hash()


def _split(part: np.ndarray, parts: int) -> list[np.ndarray]:
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [order[bounds[p]:bounds[p + 1]] for p in range(parts)]


def read_group(paths: list[str], parts: int) -> list:
    """Per shard its kept-row count, then ``parts`` hash pieces ((2, k) int64: hash, row in the
    group) and ``parts`` sha256 pieces (table: row in the group, sha256)."""
    tables = [read_kept([path], ["phash", "sha256"]) for path in paths]
    counts = np.array([table.num_rows for table in tables], np.int64)
    table = pa.concat_tables(tables, promote_options="default")
    phash = table["phash"].to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.arange(phash.size, dtype=np.int64)
    sha256 = np.asarray(table["sha256"].to_pylist(), dtype=object)
    hash_pieces = [np.stack((phash[chosen], rows[chosen])) for chosen in _split(hash_part(phash, parts), parts)]
    sha_pieces = [pa.table({"row": pa.array(rows[chosen]), "sha256": pa.array(sha256[chosen].tolist(), pa.string())})
                  for chosen in _split(sha_part(sha256, parts), parts)]
    return [counts, *hash_pieces, *sha_pieces]


def sort_part(offsets: np.ndarray, *pieces: np.ndarray) -> list[np.ndarray]:
    """One hash range over all groups: (2, d) distinct hashes ascending and the row heading each,
    and (2, l) the links of rows repeating a hash to that row."""
    values = np.concatenate([piece[0] for piece in pieces])
    rows = np.concatenate([piece[1] + offset for piece, offset in zip(pieces, offsets)])
    distinct, head, link_first, link_second = distinct_hashes(values)
    return [np.stack((distinct, rows[head])), np.stack((rows[link_first], rows[link_second]))]


def join_parts(*parts: np.ndarray) -> list[np.ndarray]:
    """The ranges in order: every distinct hash ascending, and its head row (one array each)."""
    return [np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])]


def search_share(values: np.ndarray, heads: np.ndarray, table_ids: list[int], config: DedupConfig,
                 n_items: int, once: bool) -> list[np.ndarray]:
    """The verified pairs of some tables of the plan, as (2, k) rows, and their 4 counters."""
    specs = plan_tables(config.hamming_threshold, n_items, config.tables)
    first, second, counters = search_tables(values, specs, table_ids, config, once=once)
    counts = counters.to_dict()
    return [np.stack((heads[first], heads[second])),
            np.array([counts[name] for name in ("candidate_pairs", "verified_pairs", "capped_buckets",
                                                 "capped_items")], np.int64)]


def exact_part(offsets: np.ndarray, *pieces: pa.Table) -> np.ndarray:
    """Rows of equal sha256 within one sha part, as (2, k) linked rows."""
    rows = np.concatenate([piece["row"].to_numpy() + offset for piece, offset in zip(pieces, offsets)])
    sha256 = np.concatenate([np.asarray(piece["sha256"].to_pylist(), dtype=object) for piece in pieces])
    first, second = exact_pairs(sha256)
    return np.stack((rows[first], rows[second]))


def join_clusters(n_items: int, *edges: np.ndarray) -> np.ndarray:
    """Union-find over all rows; returns the rows of clusters of two or more as (3, m) int64:
    row, root (smallest row of its cluster), cluster size; ascending rows."""
    sets = UnionFind(n_items)
    sets.union(np.concatenate([edge[0] for edge in edges]), np.concatenate([edge[1] for edge in edges]))
    roots = sets.roots()
    sizes = np.bincount(roots, minlength=n_items)
    members = np.flatnonzero(sizes[roots] > 1)
    return np.stack((members, roots[members], sizes[roots[members]]))


def group_members(paths: list[str], offset: int, members: np.ndarray) -> pa.Table:
    """What the representative choice needs of this group's rows in clusters of two or more: global
    row, root, size, pixel area, key, sha256 and normalised caption."""
    table = read_kept(paths, MEMBER_COLUMNS)
    start, end = np.searchsorted(members[0], [offset, offset + table.num_rows])
    mine = members[:, start:end]
    picked = table.take(pa.array(mine[0] - offset))
    area = (picked["original_width"].fill_null(0).to_numpy().astype(np.int64)
            * picked["original_height"].fill_null(0).to_numpy().astype(np.int64))
    return pa.table({"row": pa.array(mine[0]), "root": pa.array(mine[1]), "size": pa.array(mine[2]),
                     "area": pa.array(area), "key": picked["key"], "sha256": picked["sha256"],
                     "caption": pa.array([normalize_caption(text) for text in picked["caption"].to_pylist()],
                                         pa.string())})


def choose(*groups: pa.Table) -> list:
    """Representative and reason of every cluster member (rules: pipeline/dedup.py), as a table
    (row, size, duplicate_of, cluster_id, dup_reason) in ascending rows, and [clusters, duplicates]
    among them."""
    members = pa.concat_tables(groups)
    keys = np.asarray(members["key"].to_pylist(), dtype=object).astype(str)
    _, dense_root = np.unique(members["root"].to_numpy(), return_inverse=True)
    representative = choose_representatives(dense_root, members["area"].to_numpy(), keys)
    reasons = duplicate_reasons(representative, np.asarray(members["sha256"].to_pylist(), dtype=object),
                                np.asarray(members["caption"].to_pylist(), dtype=object))
    dropped = representative != np.arange(keys.size)
    duplicate_of = np.where(dropped, keys[representative], None)
    chosen = pa.table({"row": members["row"], "size": members["size"],
                       "duplicate_of": pa.array(duplicate_of.tolist(), pa.string()),
                       "cluster_id": pa.array(keys[representative].tolist(), pa.string()),
                       "dup_reason": pa.array(reasons.tolist(), pa.string())})
    return [chosen, np.array([keys.size - int(dropped.sum()), int(dropped.sum())], np.int64)]


def group_result(paths: list[str], offset: int, chosen: pa.Table) -> pa.Table:
    """This group's rows, in order: key, duplicate_of, cluster_id, cluster_size, dup_reason (a row
    in no cluster of two or more is its own cluster of size 1)."""
    keys = read_kept(paths, ["key"])["key"].combine_chunks().cast(pa.string())
    rows = chosen["row"].to_numpy()
    start, end = np.searchsorted(rows, [offset, offset + len(keys)])
    mine = chosen.slice(start, end - start).combine_chunks()
    local = rows[start:end] - offset
    size = np.ones(len(keys), np.int64)
    size[local] = mine["size"].to_numpy()
    # Each row's position among the members of this group, null for rows in no such cluster.
    position = np.full(len(keys), -1, np.int64)
    position[local] = np.arange(local.size)
    position = pa.array(position, mask=position < 0)
    return pa.table({"key": keys, "duplicate_of": mine["duplicate_of"].take(position),
                     "cluster_id": pc.coalesce(mine["cluster_id"].take(position), keys),
                     "cluster_size": pa.array(size), "dup_reason": mine["dup_reason"].take(position)})
