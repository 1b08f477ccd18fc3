"""Scale of the single-machine duplicate search on random 64-bit hashes with planted near duplicates.

Each size runs in its own subprocess so ``ru_maxrss`` is that run's peak. Prints one JSON line:
wall seconds, peak MiB, planted pairs found, and a brute-force comparison on a small set.

    .venv/bin/python bench/dedup_scale.py --sizes 1000000 10000000 --brute 50000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from filters.dedup import DedupConfig, find_duplicates, near_pairs, plan_tables


def planted_hashes(n_items: int, threshold: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random hashes whose last 1% are copies of the first 1% with 1..threshold bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n_items, dtype=np.int64)
    planted = max(1, n_items // 100)
    sources = np.arange(planted)
    copies = np.arange(n_items - planted, n_items)
    distance = rng.integers(1, threshold + 1, size=planted) if threshold else np.zeros(planted, int)
    bits = hashes[sources].view(np.uint64).copy()
    # Flip 'distance' distinct random bits per copy: rank 64 random keys per row, flip the lowest.
    ranks = np.argsort(rng.random((planted, 64)), axis=1)
    flip = ranks < distance[:, None]
    masks = (flip.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    hashes[copies] = (bits ^ masks).view(np.int64)
    return hashes, sources, copies


def random_sha256(n_items: int, seed: int) -> np.ndarray:
    raw = np.random.default_rng(seed + 1).integers(0, 256, size=(n_items, 32), dtype=np.uint8)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    text = np.stack((digits[raw >> 4], digits[raw & 15]), axis=2).reshape(n_items, 64)
    return text.view("S64").ravel()


def run_one(n_items: int, threshold: int, seed: int, threads: int) -> dict:
    hashes, sources, copies = planted_hashes(n_items, threshold, seed)
    sha256 = random_sha256(n_items, seed)
    keys = np.char.zfill(np.arange(n_items).astype("S9"), 9)
    area = np.zeros(n_items, np.int64)
    config = DedupConfig(hamming_threshold=threshold)
    # One-time costs of a process (numba loading its compiled tables from the disk cache, or
    # compiling them; the plan's cover search) are timed apart, so the sizes compare the search.
    start = time.perf_counter()
    find_duplicates(keys[:1000], sha256[:1000], hashes[:1000], area[:1000], config)
    plan_tables(threshold, n_items)
    warm_up_seconds = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    result = find_duplicates(keys, sha256, hashes, area, config, threads=threads)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    found = int((result.representative[sources] == result.representative[copies]).sum())
    specs = plan_tables(threshold, n_items)
    tables = len(specs)
    return {
        "n": n_items, "threshold": threshold, "threads": threads, "tables": tables,
        # Whole run over (rows x tables): flat in n means the work is linear per table.
        "ns_per_row_per_table": round(seconds / n_items / tables * 1e9, 1),
        "key_bits": [min(s.key_bits for s in specs), max(s.key_bits for s in specs)],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2), "warm_up_seconds": round(warm_up_seconds, 2),
        "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "planted": int(sources.size), "planted_found": found, **result.counters,
    }


def brute_force(n_items: int, threshold: int, seed: int) -> dict:
    hashes, _, _ = planted_hashes(n_items, threshold, seed)
    bits = hashes.view(np.uint64)
    start = time.perf_counter()
    pairs = []
    for row in range(0, n_items, 512):
        block = bits[row:row + 512]
        close = np.bitwise_count(block[:, None] ^ bits[None, :]) <= threshold
        first, second = np.nonzero(close)
        first = first + row
        keep = first < second
        pairs.append(first[keep] * n_items + second[keep])
    brute = np.unique(np.concatenate(pairs))
    brute_seconds = time.perf_counter() - start
    near_pairs(hashes[:1000], DedupConfig(hamming_threshold=threshold))  # one-time costs, as above
    plan_tables(threshold, n_items)
    start = time.perf_counter()
    first, second, _ = near_pairs(hashes, DedupConfig(hamming_threshold=threshold))
    mih_seconds = time.perf_counter() - start
    mih = np.unique(np.minimum(first, second) * n_items + np.maximum(first, second))
    return {"n": n_items, "brute_pairs": int(brute.size), "mih_pairs": int(mih.size),
            "same_pairs": bool(np.array_equal(brute, mih)), "brute_seconds": round(brute_seconds, 2),
            "mih_seconds": round(mih_seconds, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--threshold", type=int, default=DedupConfig().hamming_threshold)
    parser.add_argument("--brute", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, help="internal: run one size in this process")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.threshold, args.seed, args.threads)))
        return
    runs = []
    for size in args.sizes:
        output = subprocess.run([sys.executable, __file__, "--one", str(size), "--threshold",
                                 str(args.threshold), "--seed", str(args.seed), "--threads", str(args.threads)],
                                check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    report = {"bench": "dedup_scale", "runs": runs}
    if len(runs) >= 2:
        report["time_ratio_last_over_first"] = round(runs[-1]["seconds"] / runs[0]["seconds"], 2)
        report["tables_ratio_last_over_first"] = round(runs[-1]["tables"] / runs[0]["tables"], 2)
    if args.brute:
        report["brute_force"] = brute_force(args.brute, args.threshold, args.seed)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
