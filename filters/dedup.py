"""Exact and near-duplicate detection over 64-bit perceptual hashes, vectorised with numpy.

Near duplicates are pairs whose pHash Hamming distance is at most ``hamming_threshold`` (k).
Candidates come from multi-index hashing (Manku, Jain & Das Sarma, WWW 2007): the 64 bits are cut
into ``m > k`` blocks; two hashes within distance k differ in at most k blocks, so they agree
exactly on at least ``m - k`` of them. One table per choice of ``m - k`` blocks, keyed by those
blocks, therefore puts every such pair in a common bucket at least once. ``m`` is chosen so the key
has about log2(n) bits: buckets then hold O(1) random items and the work is linear in n per table
(plain k+1 bands keep 64/(k+1)-bit keys, whose buckets grow with n and cost n squared).

Every candidate is verified by its exact Hamming distance; edges go to an array union-find; each
cluster keeps one representative (largest original pixel area, ties to the smallest key).

The building blocks (:func:`plan_tables`, :func:`distinct_hashes`, :func:`search_tables`,
:class:`UnionFind`, :func:`choose_representatives`, :func:`duplicate_reasons`) are shared with the
distributed search in ``pipeline/dedup.py``, so both give the same clusters and the same counters.
"""
from __future__ import annotations

import functools
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from filters.base import DUPLICATE_CAPTION_AND_IMAGE, EXACT_DUPLICATE, NEAR_DUPLICATE
from pipeline.configtools import ranged

# Relative cost of one candidate pair against one table record, as measured for the compiled
# table search (filters/dedup_kernel.py, bench/dedup_scale.py: ~18 ns a record, ~20 ns a pair in
# buckets of 2-3). It only steers the plan's choice between more tables and longer keys.
PAIR_COST = 1.0
MAX_TABLES = 5000
# Covering plans are searched greedily over every (blocks choose key blocks) table; above this many
# (tables x dirty-block sets) entries the search takes over a second and is skipped.
MAX_COVER_SEARCH = 8_000_000


@dataclass
class DedupConfig:
    """Thresholds of the duplicate search.

    ``hamming_threshold``: largest pHash distance still called a near duplicate (6: see
    docs/BENCHMARKS.md, no false merge on 1,000 distinct photos and 10M hashes in minutes).
    ``bucket_cap``: most distinct hashes paired inside one bucket; the rest of an oversized bucket
    (flat colour images collide) is left out of that table and counted.
    ``tables``: upper bound on the number of tables (None: chosen from the cost model).
    """

    hamming_threshold: int = ranged(6, "[0, 63]")  # distances of 64-bit hashes; plan_tables' limit
    bucket_cap: int = ranged(1000, "[1, inf)")
    tables: int | None = ranged(None, f"[1, {MAX_TABLES}]")


@dataclass(frozen=True)
class TableSpec:
    """One multi-index table: the blocks, as (shift, width) from the top bit, that form its key."""

    table_id: int
    blocks: tuple[tuple[int, int], ...]

    @property
    def key_bits(self) -> int:
        return sum(width for _, width in self.blocks)


@dataclass
class PairCounters:
    """Work done by the candidate search; adds up across tables and workers."""

    candidate_pairs: int = 0
    verified_pairs: int = 0
    capped_buckets: int = 0
    capped_items: int = 0

    def add(self, other: "PairCounters") -> None:
        self.candidate_pairs += other.candidate_pairs
        self.verified_pairs += other.verified_pairs
        self.capped_buckets += other.capped_buckets
        self.capped_items += other.capped_items

    def to_dict(self) -> dict[str, int]:
        return {name: int(value) for name, value in vars(self).items()}


def _block_layout(n_blocks: int) -> list[tuple[int, int]]:
    base, extra = divmod(64, n_blocks)
    widths = [base + 1 if block < extra else base for block in range(n_blocks)]
    layout, top = [], 64
    for width in widths:
        top -= width
        layout.append((top, width))
    return layout


def _plan_cost(n_items: int, layout: list[tuple[int, int]], tables: list[tuple[int, ...]]) -> float:
    """tables x n records, plus PAIR_COST per expected random pair (n^2 / 2^(key bits + 1) a table)."""
    widths = [width for _, width in layout]
    return sum(n_items + PAIR_COST * n_items * n_items / 2.0 ** (sum(widths[b] for b in table) + 1)
               for table in tables)


@functools.lru_cache(maxsize=None)
def _covering_tables(n_blocks: int, threshold: int, key_blocks: int) -> tuple[tuple[int, ...], ...]:
    """Sets of ``key_blocks`` blocks such that any ``threshold`` blocks miss at least one set.

    A pair within ``threshold`` bits differs in at most that many blocks, so some set of the
    result lies wholly in blocks where the two hashes agree: the pair shares that table's bucket.
    With ``key_blocks = n_blocks - threshold`` this is every combination (Manku et al.); fewer
    key blocks leave several clean sets per pair, and a greedy cover needs far fewer tables than
    all combinations (9 blocks choose 3 = 84 tables of 21-22 bits, against 62 tables of 20-24
    bits from 12 blocks choose 4 covered greedily, at t = 6). Deterministic: ties go to the first
    set.
    """
    candidates = list(itertools.combinations(range(n_blocks), key_blocks))
    if key_blocks == n_blocks - threshold:
        return tuple(candidates)
    dirty = list(itertools.combinations(range(n_blocks), threshold))
    candidate_masks = np.array([sum(1 << b for b in table) for table in candidates], np.uint64)
    dirty_masks = np.array([sum(1 << b for b in blocks) for blocks in dirty], np.uint64)
    # covers[t, d]: table t avoids dirty set d. Float so each step's gains are one BLAS product.
    covers = ((candidate_masks[:, None] & dirty_masks[None, :]) == 0).astype(np.float32)
    uncovered = np.ones(len(dirty), np.float32)
    chosen = []
    while uncovered.any():
        best = int(np.argmax(covers @ uncovered))
        chosen.append(candidates[best])
        uncovered[covers[best] > 0] = 0
    return tuple(chosen)


def plan_tables(threshold: int, n_items: int, max_tables: int | None = None) -> list[TableSpec]:
    """Tables that find every pair within ``threshold`` bits among ``n_items`` hashes.

    Tries block counts m > threshold with key sets of m - threshold blocks (every combination) or
    fewer (a greedy cover, where small enough to search), and keeps the cheapest by the cost
    model tables * n + PAIR_COST * sum over tables of n^2 / 2^(key_bits + 1): keys of about
    log2(n) bits, with as few tables as the threshold allows.
    """
    if not 0 <= threshold < 64:
        raise ValueError(f"hamming threshold must be in [0, 63], got {threshold}")
    limit = min(max_tables or MAX_TABLES, MAX_TABLES)
    n_items = max(n_items, 2)
    best: tuple[float, list[tuple[int, int]], tuple[tuple[int, ...], ...]] | None = None
    for n_blocks in range(threshold + 1, 65):
        layout = _block_layout(n_blocks)
        all_combinations = math.comb(n_blocks, threshold)
        # Every combination, then covers with one or two key blocks fewer (more tables would be
        # needed below that than the plans with fewer, wider blocks already offer).
        for key_blocks in range(n_blocks - threshold, max(n_blocks - threshold - 3, 0), -1):
            full = key_blocks == n_blocks - threshold
            if (all_combinations > limit) if full else (
                    n_blocks > 16 or math.comb(n_blocks, key_blocks) * all_combinations > MAX_COVER_SEARCH):
                continue
            tables = _covering_tables(n_blocks, threshold, key_blocks)
            if len(tables) > limit:
                continue
            cost = _plan_cost(n_items, layout, list(tables))
            if best is None or cost < best[0]:
                best = (cost, layout, tables)
        # Past 16 blocks no cover is searched, so once every combination is over the limit too,
        # larger block counts offer nothing.
        if all_combinations > limit and n_blocks >= 16:
            break
    if best is None:  # max_tables is below threshold + 1, the fewest tables any exact plan has
        # (one block each, threshold + 1 blocks: some block holds no differing bit); use that.
        layout = _block_layout(threshold + 1)
        best = (0.0, layout, tuple((block,) for block in range(threshold + 1)))
    _, layout, tables = best
    return [TableSpec(table_id, tuple(layout[b] for b in blocks)) for table_id, blocks in enumerate(tables)]


def table_keys(phash: np.ndarray, spec: TableSpec) -> np.ndarray:
    """Bucket key of every hash in one table: its chosen blocks, concatenated, as uint64."""
    bits = np.asarray(phash, dtype=np.int64).view(np.uint64)
    keys = np.zeros(bits.shape, dtype=np.uint64)
    for shift, width in spec.blocks:
        keys <<= np.uint64(width)
        keys |= (bits >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    return keys


def hamming(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance of two int64 hash arrays."""
    return np.bitwise_count(np.asarray(first, np.int64).view(np.uint64) ^ np.asarray(second, np.int64).view(np.uint64))


def sorted_bucket_pairs(
    keys: np.ndarray, phash: np.ndarray, threshold: int, cap: int
) -> tuple[np.ndarray, np.ndarray, PairCounters]:
    """Verified pairs of positions inside runs of equal ``keys``.

    ``keys`` is sorted and ``phash`` holds the hash at each position; within a run the hashes are
    distinct and ascending, so capping a run to its first ``cap`` positions is deterministic.
    Returns positions (first, second) with first < second, and the counters.
    """
    counters = PairCounters()
    empty = np.empty(0, np.int64)
    if keys.size < 2:
        return empty, empty, counters
    cut = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = np.concatenate(([0], cut))
    sizes = np.diff(np.concatenate((starts, [keys.size])))
    oversized = sizes > cap
    counters.capped_buckets = int(oversized.sum())
    counters.capped_items = int((sizes[oversized] - cap).sum())
    # Rank of each position inside its bucket; positions ranked at or past the cap are left out.
    rank = np.arange(keys.size) - np.repeat(starts, sizes)
    # Pass d pairs every position with the one d places later, if still in the same bucket and
    # under the cap. Bucket membership is monotone in d, so each pass filters the previous one:
    # the work is the number of pairs plus n, with no per-bucket Python loop.
    active = np.flatnonzero((keys[1:] == keys[:-1]) & (rank[1:] < cap))
    found_first, found_second = [empty], [empty]
    distance = 1
    while active.size:
        partner = active + distance
        counters.candidate_pairs += active.size
        close = hamming(phash[active], phash[partner]) <= threshold
        found_first.append(active[close])
        found_second.append(partner[close])
        distance += 1
        partner = active + distance
        inside = partner < keys.size
        active, partner = active[inside], partner[inside]
        still = (keys[partner] == keys[active]) & (rank[partner] < cap)
        active = active[still]
    first, second = np.concatenate(found_first), np.concatenate(found_second)
    counters.verified_pairs = int(first.size)
    return first, second, counters


def pairs_in_bucket(indices: np.ndarray, phashes: np.ndarray, threshold: int, cap: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Verified near-duplicate pairs (as ``indices`` entries) among the members of one bucket."""
    first, second, chain_first, chain_second, _, _ = bucket_pairs(
        np.zeros(len(indices), np.int64), np.asarray(indices, np.int64), phashes, threshold, cap)
    return np.concatenate((first, chain_first)), np.concatenate((second, chain_second))


def bucket_pairs(
    buckets: np.ndarray, items: np.ndarray, phash: np.ndarray, threshold: int, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, PairCounters]:
    """Pairs from records (bucket, item, phash) holding any number of buckets and repeated hashes.

    Items with the same hash in a bucket are chained (distance 0: always duplicates, never capped);
    the distinct hashes of each bucket go through :func:`sorted_bucket_pairs`, exactly as the
    single-machine path does after its global collapse of equal hashes.
    Returns (near_first, near_second, chain_first, chain_second, chain_bucket, counters) in items.
    """
    items = np.asarray(items, np.int64)
    buckets = np.asarray(buckets)
    values, value_ids = np.unique(np.asarray(phash, np.int64), return_inverse=True)
    _, bucket_ids = np.unique(buckets, return_inverse=True)
    combined = (bucket_ids.astype(np.int64) << 32) | value_ids.astype(np.int64)
    order = np.lexsort((items, combined))
    combined, items, buckets = combined[order], items[order], buckets[order]
    same = combined[1:] == combined[:-1]
    head = np.concatenate(([True], ~same))
    heads = np.flatnonzero(head)
    first, second, counters = sorted_bucket_pairs(
        combined[heads] >> 32, values[combined[heads] & 0xFFFFFFFF], threshold, cap)
    return (items[heads[first]], items[heads[second]],
            items[:-1][same], items[1:][same], buckets[1:][same], counters)


class UnionFind:
    """Disjoint sets over 0..size-1 in one parent array, joined a whole edge list at a time.

    Each round hooks the larger root of every unjoined edge under the smallest root offered to it
    (``np.minimum.at``: no cycles, since roots only point down), then halves every path.
    """

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size, dtype=np.int64)

    def _compress(self) -> None:
        while True:
            grand = self.parent[self.parent]
            if np.array_equal(grand, self.parent):
                return
            self.parent = grand

    def union(self, first: np.ndarray, second: np.ndarray) -> None:
        first = np.asarray(first, np.int64)
        second = np.asarray(second, np.int64)
        while first.size:
            root_first, root_second = self.parent[first], self.parent[second]
            apart = root_first != root_second
            first, second = first[apart], second[apart]
            root_first, root_second = root_first[apart], root_second[apart]
            if not first.size:
                return
            np.minimum.at(self.parent, np.maximum(root_first, root_second), np.minimum(root_first, root_second))
            self._compress()

    def roots(self) -> np.ndarray:
        """Root of every element (the smallest index in its set)."""
        self._compress()
        return self.parent.copy()


def choose_representatives(roots: np.ndarray, area: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each element's representative: largest area in its set, ties to the smallest key."""
    representative = np.arange(roots.size, dtype=np.int64)
    sizes = np.bincount(roots, minlength=roots.size)
    members = np.flatnonzero(sizes[roots] > 1)
    if members.size == 0:
        return representative
    order = members[np.lexsort((keys[members], -np.asarray(area, np.int64)[members], roots[members]))]
    first_of_set = np.concatenate(([True], roots[order][1:] != roots[order][:-1]))
    chosen = np.empty(roots.size, np.int64)
    chosen[roots[order][first_of_set]] = order[first_of_set]
    representative[members] = chosen[roots[members]]
    return representative


_HEX_DIGITS = np.full(256, 255, np.uint8)
_HEX_DIGITS[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGITS[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGITS[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def hex_prefix(values: np.ndarray) -> np.ndarray | None:
    """The first 16 hex digits of each string as uint64, or None when they are not all hex.

    Sorting these is about ten times faster than sorting the strings themselves.
    """
    values = np.asarray(values)
    try:
        raw = values if values.dtype.kind == "S" else values.astype("S64")
    except (UnicodeEncodeError, ValueError):
        return None
    if raw.dtype.itemsize < 16:
        return None
    digits = _HEX_DIGITS[raw.view(np.uint8).reshape(raw.size, raw.dtype.itemsize)[:, :16]]
    if digits.size and digits.max() == 255:
        return None
    # Two hex digits make one byte; eight bytes read big-endian are the prefix.
    packed = (digits[:, 0::2] << np.uint8(4)) | digits[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)


def exact_pairs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive pairs of positions holding equal values (sha256 hex strings, or any strings)."""
    values = np.asarray(values)
    prefix = hex_prefix(values) if values.size else None
    if prefix is None:
        order = np.argsort(values, kind="stable")
        same = values[order][1:] == values[order][:-1]
        return order[:-1][same], order[1:][same]
    # Sort (prefix top bits, position) packed in one word: several times faster than an argsort.
    id_bits = max(1, int(values.size - 1).bit_length())
    packed = np.sort(((prefix >> np.uint64(id_bits)) << np.uint64(id_bits))
                     | np.arange(values.size, dtype=np.uint64))
    order = (packed & np.uint64((1 << id_bits) - 1)).astype(np.int64)
    top = packed >> np.uint64(id_bits)
    tied = top[1:] == top[:-1]
    # Only rows sharing a truncated prefix can be equal (duplicates, and rare random collisions):
    # order those few runs by the whole value so equal values sit next to each other.
    in_run = np.flatnonzero(np.concatenate(([False], tied)) | np.concatenate((tied, [False])))
    if in_run.size:
        run_rows = order[in_run]
        order[in_run] = run_rows[np.lexsort((values[run_rows], top[in_run]))]
    candidates = np.flatnonzero(tied)
    left, right = order[candidates], order[candidates + 1]
    same = values[left] == values[right]
    return left[same], right[same]


def duplicate_reasons(representative: np.ndarray, sha256: np.ndarray | None,
                      normalized_captions: np.ndarray | None) -> np.ndarray:
    """Why each row is dropped: None for representatives and singletons, else one of

    ``duplicate_caption_and_image`` (its normalised caption equals the representative's, both
    non-empty), otherwise ``exact_duplicate`` (same sha256 as the representative), otherwise
    ``near_duplicate``.
    """
    reasons = np.full(representative.size, None, dtype=object)
    dropped = np.flatnonzero(representative != np.arange(representative.size))
    reasons[dropped] = NEAR_DUPLICATE
    if sha256 is not None:
        sha256 = np.asarray(sha256, dtype=object)
        exact = dropped[sha256[dropped] == sha256[representative[dropped]]]
        reasons[exact] = EXACT_DUPLICATE
    if normalized_captions is not None:
        captions = np.asarray(normalized_captions, dtype=object)
        own, theirs = captions[dropped], captions[representative[dropped]]
        same = ((own == theirs) & (own != None) & (own != "")).astype(bool)  # noqa: E711 (elementwise)
        reasons[dropped[same]] = DUPLICATE_CAPTION_AND_IMAGE
    return reasons


@dataclass
class DedupResult:
    """Per-item outcome of a duplicate search, aligned with the input order.

    ``representative[i]`` is the index of item i's cluster representative (i itself when kept);
    ``duplicate_of`` / ``cluster_id`` give the same as keys; ``dup_reason`` is None when kept.
    """

    keys: np.ndarray
    representative: np.ndarray
    cluster_size: np.ndarray
    dup_reason: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def cluster_id(self) -> np.ndarray:
        return self.keys[self.representative]

    @property
    def duplicate_of(self) -> np.ndarray:
        duplicate_of = np.full(self.keys.size, None, dtype=object)
        dropped = np.flatnonzero(self.representative != np.arange(self.keys.size))
        duplicate_of[dropped] = self.keys[self.representative[dropped]]
        return duplicate_of


def resolve_clusters(keys: np.ndarray, area: np.ndarray, first: np.ndarray, second: np.ndarray,
                     sha256: np.ndarray | None = None, normalized_captions: np.ndarray | None = None,
                     counters: dict[str, int] | None = None) -> DedupResult:
    """Union the verified edges (item indices), pick representatives and say why rows drop."""
    keys = np.asarray(keys)
    sets = UnionFind(keys.size)
    sets.union(first, second)
    roots = sets.roots()
    representative = choose_representatives(roots, area, keys)
    cluster_size = np.bincount(roots, minlength=keys.size)[roots]
    reasons = duplicate_reasons(representative, sha256, normalized_captions)
    return DedupResult(keys, representative, cluster_size, reasons, dict(counters or {}))


def distinct_hashes(phash: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct hashes, ascending, the item heading each, and the links of the other items.

    Equal hashes are distance 0: each item repeating a hash is linked to the item heading it, so the
    tables only see distinct hashes, in ascending order, which makes the bucket cap deterministic.
    Returns (values, head_item, link_first, link_second).
    """
    phash = np.asarray(phash, np.int64)
    # Which of several equal hashes heads them does not matter (they are all linked to it), so the
    # faster unstable argsort is enough; it is still deterministic.
    order = np.argsort(phash)
    sorted_hashes = phash[order]
    new_value = np.concatenate((np.ones(min(1, phash.size), bool), sorted_hashes[1:] != sorted_hashes[:-1]))
    head_item = order[new_value]
    value_of_sorted = np.cumsum(new_value) - 1
    return sorted_hashes[new_value], head_item, head_item[value_of_sorted[~new_value]], order[~new_value]


def search_tables(values: np.ndarray, specs: list[TableSpec], table_ids: list[int], config: DedupConfig,
                  once: bool, threads: int = 1) -> tuple[np.ndarray, np.ndarray, PairCounters]:
    """Verified pairs of the tables ``table_ids`` of the plan ``specs`` over the distinct ascending
    hashes ``values``, as positions in ``values``, and the counters of those tables.

    With ``once`` a pair comes back only from the first table of the whole plan whose key blocks it
    agrees on (so searching disjoint shares of the tables, on any machines, returns each pair once);
    without, every table returns every pair it verifies.
    """
    # numba compiles on first use (cached on disk after); imported here so that importing this
    # module stays cheap for the CLI.
    from filters.dedup_kernel import partition_bits, table_pairs

    values = np.asarray(values, np.int64)
    sorted_bits = values.view(np.uint64)
    # One set of work buffers per thread: fresh pages cost a fault each, which is most of a pass.
    local = threading.local()
    # The plan's tables as block masks over its layout, for the kernel's "found earlier" test.
    layout = sorted({block for spec in specs for block in spec.blocks}, reverse=True)
    layout_shifts = np.array([shift for shift, _ in layout], np.uint64)
    layout_widths = np.array([width for _, width in layout], np.uint64)
    table_masks = np.array([sum(1 << layout.index(block) for block in spec.blocks) for spec in specs], np.uint64)

    def one_table(spec: TableSpec) -> tuple[np.ndarray, np.ndarray, PairCounters]:
        if not hasattr(local, "buffers"):
            local.buffers = [np.empty(values.size, np.uint64) for _ in range(4)]
        shifts = np.array([shift for shift, _ in spec.blocks], np.uint64)
        widths = np.array([width for _, width in spec.blocks], np.uint64)
        earlier = table_masks[:spec.table_id] if once else table_masks[:0]
        pair_first, pair_second, found = table_pairs(
            sorted_bits, shifts, widths, spec.key_bits, partition_bits(values.size, spec.key_bits),
            config.hamming_threshold, config.bucket_cap, *local.buffers, layout_shifts, layout_widths, earlier)
        # The kernel returns hash values; 'values' is sorted, so their positions are a binary search.
        return (np.searchsorted(values, pair_first.view(np.int64)), np.searchsorted(values, pair_second.view(np.int64)),
                PairCounters(*(int(count) for count in found)))

    found_first, found_second, counters = [np.empty(0, np.int64)], [np.empty(0, np.int64)], PairCounters()
    # The compiled tables release the GIL, so tables overlap on threads without copies.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for pair_first, pair_second, table_counters in pool.map(one_table, [specs[i] for i in table_ids]):
            counters.add(table_counters)
            found_first.append(pair_first)
            found_second.append(pair_second)
    return np.concatenate(found_first), np.concatenate(found_second), counters


def near_pairs(phash: np.ndarray, config: DedupConfig, n_items: int | None = None, threads: int = 1
               ) -> tuple[np.ndarray, np.ndarray, PairCounters]:
    """All pairs of items within the threshold, over every table, as item indices.

    Equal hashes are collapsed first (:func:`distinct_hashes`); each near pair comes back once,
    from the first table in plan order that shares it (:func:`search_tables`).
    """
    values, head_item, link_first, link_second = distinct_hashes(phash)
    specs = plan_tables(config.hamming_threshold, n_items or np.asarray(phash).size, config.tables)
    every_table = list(range(len(specs)))
    first, second, counters = search_tables(values, specs, every_table, config, once=True, threads=threads)
    if counters.capped_buckets:
        # A capped bucket may have left out a pair that its first table would have returned;
        # rare (flat images), so then every table returns every pair it verifies.
        first, second, counters = search_tables(values, specs, every_table, config, once=False, threads=threads)
    return (np.concatenate((link_first, head_item[first])), np.concatenate((link_second, head_item[second])),
            counters)


def find_duplicates(keys: np.ndarray, sha256: np.ndarray | None, phash: np.ndarray, area: np.ndarray,
                    config: DedupConfig, normalized_captions: np.ndarray | None = None,
                    threads: int = 1) -> DedupResult:
    """Single-machine duplicate search: exact (sha256) and near (pHash) duplicates in one clustering.

    ``area`` is the original pixel area (width * height) used to pick representatives; ``threads``
    is how many tables are searched at once.
    """
    first, second, counters = near_pairs(phash, config, threads=threads)
    if sha256 is not None:
        exact_first, exact_second = exact_pairs(sha256)
        first, second = np.concatenate((first, exact_first)), np.concatenate((second, exact_second))
    return resolve_clusters(keys, area, first, second, sha256, normalized_captions, counters.to_dict())
