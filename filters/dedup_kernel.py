"""Compiled (numba) search of one multi-index table: bucket by key, verify pairs inside buckets.

Why compiled: in numpy one table costs ~20 full passes over the hashes (key, pack, sort, unpack,
gather, run detection, ranks), and at 10M hashes those arrays leave the CPU caches, so the cost
per hash doubles between 1M and 10M. Here a table is a two-level counting pass on its key:

1. one pass computes every key and counts its top ``part_bits``, one pass scatters the hashes
   (and the rest of their keys) into those partitions, stably: the only pass that writes across
   the whole array;
2. inside each partition (a few thousand hashes, in the L1/L2 cache) the rest of the key is
   counted; the hashes of buckets holding two or more are gathered, in input order, and searched
   pair by pair with a hardware popcount. Singletons (most hashes at ~log2(n)-bit keys) cost two
   counter updates.

Work is linear in n plus the candidate pairs, and the memory traffic per hash does not depend on n
(bench/dedup_scale.py, whole run: 23.1 and 25.8 ns per hash and table at 1M and 10M). A bucket lists its
hashes in the input order (ascending), so the bucket cap keeps the same first ``cap`` hashes as the
numpy path (:func:`filters.dedup.sorted_bucket_pairs`) and the Ray path.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# Hashes per partition in step 2: 4,096 uint64 are 32 KiB, so a partition stays in L1/L2.
PARTITION_ITEMS = 4096


@intrinsic
def _popcount(typingctx, value):  # noqa: ARG001 (numba's intrinsic signature)
    """Hardware popcount (LLVM ctpop) of a uint64; numba has no population count of its own."""
    signature = types.uint64(types.uint64)

    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.ctpop(args[0])

    return signature, codegen


@njit(inline="always")
def _key(value, shifts, widths):
    key = np.uint64(0)
    for block in range(shifts.size):
        key = (key << widths[block]) | ((value >> shifts[block]) & ((np.uint64(1) << widths[block]) - np.uint64(1)))
    return key


@njit(inline="always")
def _found_earlier(difference, layout_shifts, layout_widths, earlier_tables):
    """Whether some earlier table's key blocks all agree for a pair with this XOR of hashes."""
    if earlier_tables.size == 0:
        return False
    dirty = np.uint64(0)
    for block in range(layout_shifts.size):
        mask = (np.uint64(1) << layout_widths[block]) - np.uint64(1)
        if (difference >> layout_shifts[block]) & mask:
            dirty |= np.uint64(1) << np.uint64(block)
    for table in range(earlier_tables.size):
        if earlier_tables[table] & dirty == 0:
            return True
    return False


@njit(nogil=True, cache=True)
def _grow(array, size):
    grown = np.empty(max(2 * array.size, size), array.dtype)
    grown[:array.size] = array
    return grown


@njit(nogil=True, cache=True)
def table_pairs(values, shifts, widths, key_bits, part_bits, threshold, cap, keys, parted, parted_key, local,
                layout_shifts, layout_widths, earlier_tables):
    """Verified pairs of one table over ``values`` (distinct uint64 hashes, in a fixed order).

    ``shifts``/``widths`` (uint64) are the table's blocks, from the top of the key down;
    ``layout_shifts``/``layout_widths`` are all blocks of the plan, and ``earlier_tables`` holds,
    for each table before this one in the plan, a mask of the blocks (bit i: layout block i) its
    key uses. A verified pair is returned only when no earlier table's key blocks all agree for
    it: that table returns it, so each pair comes back once over the whole plan instead of once
    per table it shares (a close pair shares about half of them). Pass an empty
    ``earlier_tables`` to get every pair this table verifies. The counters count every one.
    ``keys``, ``parted``, ``parted_key`` and ``local`` are uint64 work buffers of ``values.size``
    items, reused across tables (fresh pages cost a fault each, most of a pass on a VM).
    Returns (first, second, counters): the two hash values of every pair in a common bucket within
    ``threshold`` bits, and [candidate_pairs, verified_pairs, capped_buckets, capped_items].
    """
    n = values.size
    n_parts = 1 << part_bits
    low_bits = np.uint64(key_bits - part_bits)
    low_mask = (np.uint64(1) << low_bits) - np.uint64(1)
    # Step 1: partition on the top bits of the key, stably (each key computed once).
    starts = np.zeros(n_parts + 1, np.int64)
    for item in range(n):
        key = _key(values[item], shifts, widths)
        keys[item] = key
        starts[(key >> low_bits) + np.uint64(1)] += 1
    for part in range(n_parts):
        starts[part + 1] += starts[part]
    fill = starts[:-1].copy()
    for item in range(n):
        key = keys[item]
        slot = fill[key >> low_bits]
        parted[slot] = values[item]
        parted_key[slot] = key & low_mask
        fill[key >> low_bits] = slot + 1
    # Step 2: inside each partition (a cache-sized slice), count the rest of the key; only the
    # hashes of buckets holding two or more are gathered, in input order, and searched pair by pair.
    counts = np.zeros(1 << (key_bits - part_bits), np.int64)
    largest = 0
    for part in range(n_parts):
        largest = max(largest, starts[part + 1] - starts[part])
    group_start = np.empty(largest // 2 + 1, np.int64)
    group_size = np.empty(largest // 2 + 1, np.int64)
    first = np.empty(1024, np.uint64)
    second = np.empty(1024, np.uint64)
    found, verified = 0, 0
    candidates, capped_buckets, capped_items = 0, 0, 0
    limit = np.uint64(threshold)
    for part in range(n_parts):
        begin, end = starts[part], starts[part + 1]
        members = end - begin
        if members < 2:
            continue
        shared = 0
        local_key = parted_key[begin:end]
        for position in range(members):
            key = local_key[position]
            counts[key] += 1
            if counts[key] == 2:
                shared += 1
        if shared:
            # A shared bucket gets its slice of 'local' when first met; from then on its counter
            # holds -(next free slot + 1).
            gathered, groups = 0, 0
            for position in range(members):
                key = local_key[position]
                if counts[key] >= 2:
                    group_start[groups] = gathered
                    group_size[groups] = counts[key]
                    groups += 1
                    counts[key] = -(gathered + 1)
                    gathered += group_size[groups - 1]
                if counts[key] < 0:
                    local[-counts[key] - 1] = parted[begin + position]
                    counts[key] -= 1
            for group in range(groups):
                size = group_size[group]
                if size > cap:
                    capped_buckets += 1
                    capped_items += size - cap
                    size = cap
                candidates += size * (size - 1) // 2
                one = group_start[group]
                for left in range(one, one + size - 1):
                    value = local[left]
                    for right in range(left + 1, one + size):
                        if _popcount(value ^ local[right]) <= limit:
                            verified += 1
                            if _found_earlier(value ^ local[right], layout_shifts, layout_widths, earlier_tables):
                                continue
                            if found == first.size:
                                first = _grow(first, found + 1)
                                second = _grow(second, found + 1)
                            first[found] = value
                            second[found] = local[right]
                            found += 1
        for position in range(members):
            counts[local_key[position]] = 0
    counters = np.array([candidates, verified, capped_buckets, capped_items], np.int64)
    return first[:found], second[:found], counters


def partition_bits(n_items: int, key_bits: int) -> int:
    """Top key bits used for the first pass: partitions of about PARTITION_ITEMS hashes, and at most
    2^14 counters (128 KiB) for the rest of the key, so they stay in the L2 cache."""
    wanted = max(0, (max(n_items, 1) // PARTITION_ITEMS).bit_length())
    return min(key_bits, max(wanted, key_bits - 14))
