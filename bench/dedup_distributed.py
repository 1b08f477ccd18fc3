"""The distributed duplicate search (`pipeline.dedup.find_duplicates_distributed`) against the
in-driver search (`pipeline.dedup.find_duplicates_in_driver`) on the same synthetic shards.

Writes N rows as parquet shards shaped like the pipeline's (key, sha256, phash, original_width,
original_height, caption, drop_reason = null), with 1% planted near duplicates (the phash of an
earlier row of an earlier shard with 1..6 random bits flipped) and 0.1% planted exact duplicates
(same sha256 and phash as a row of an earlier shard). Starts a local Ray as the pipeline does
(`pipeline.ray_adapter.init_ray`), then times, in this order: the distributed search on cold
workers (`distributed_seconds`: the headline, what a build's first search pays), the in-driver
search (one warm-up call on one shard first, then timed), and the distributed search again on the
now warm workers. Checks both give the same table and counters and that every planted pair ended
in one cluster.

Per step of the distributed search (each Ray task wrapped here): calls, wall and CPU seconds
summed, the largest peak RSS of one task (VmHWM, reset at each task's start through
/proc/self/clear_refs, so it is that task's own peak; it includes the object-store pages the task
mapped, given apart as the largest RssShmem at a task's end; ``task_growth_mib`` is the peak less
the worker's RSS when the task began: its imports and earlier tasks' leftovers left out), and the bytes the step's results
put in the object store (numpy / arrow nbytes of what the tasks return). The in-driver peak is
the benchmark process's own (it runs after the distributed search, so the figure is the larger
of the two driver peaks; `driver_peak_mib_before_in_driver` is the distributed search's).
Each size runs in its own subprocess with its own Ray. Prints one JSON line per size.

    .venv/bin/python bench/dedup_distributed.py --rows 1000000 10000000 --timeout 1800
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from filters.dedup import DedupConfig, plan_tables

STEPS = ("read_group", "sort_part", "exact_part", "join_parts", "search_share", "join_clusters",
         "group_members", "choose")


SHARD_ROWS = 10_000
NEAR_SHARE = 0.01
EXACT_SHARE = 0.001


def _string_array(raw: np.ndarray) -> pa.Array:
    """Fixed-width bytes (numpy S<w>) to an arrow string array without a Python loop."""
    width = raw.dtype.itemsize
    offsets = np.arange(raw.size + 1, dtype=np.int32) * width
    return pa.StringArray.from_buffers(raw.size, pa.py_buffer(offsets), pa.py_buffer(raw.tobytes()))


def _hex(raw: np.ndarray) -> np.ndarray:
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    text = np.stack((digits[raw >> 4], digits[raw & 15]), axis=2).reshape(raw.shape[0], -1)
    return np.ascontiguousarray(text).view(f"S{text.shape[1]}").ravel()


def _flip_bits(hashes: np.ndarray, distance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each hash with ``distance`` distinct random bits flipped."""
    ranks = np.argsort(rng.random((hashes.size, 64)), axis=1)
    flip = ranks < distance[:, None]
    masks = (flip.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    return (hashes.view(np.uint64) ^ masks).view(np.int64)


def _earlier_source(copies: np.ndarray, candidates: np.ndarray, shard_rows: int,
                    rng: np.random.Generator) -> np.ndarray:
    """For each copy, a random candidate row in a shard before the copy's shard."""
    before = np.searchsorted(candidates, (copies // shard_rows) * shard_rows)
    return candidates[(rng.random(copies.size) * before).astype(np.int64)]


def write_shards(n_rows: int, folder: Path, threshold: int, seed: int, shard_rows: int = SHARD_ROWS) -> dict:
    """Write the shards; returns paths and the planted (source, copy) row indices."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n_rows, dtype=np.int64,
                         endpoint=True)
    sha_raw = rng.integers(0, 256, size=(n_rows, 32), dtype=np.uint8)
    # Copies only in shards 1.., sources only among rows that are not copies themselves.
    later = np.arange(min(shard_rows, n_rows), n_rows)
    n_near, n_exact = int(n_rows * NEAR_SHARE), int(n_rows * EXACT_SHARE)
    chosen = rng.choice(later, size=min(later.size, n_near + n_exact), replace=False)
    near_copies, exact_copies = np.sort(chosen[:n_near]), np.sort(chosen[n_near:])
    is_copy = np.zeros(n_rows, bool)
    is_copy[chosen] = True
    candidates = np.flatnonzero(~is_copy)
    near_sources = _earlier_source(near_copies, candidates, shard_rows, rng)
    exact_sources = _earlier_source(exact_copies, candidates, shard_rows, rng)
    distance = (rng.integers(1, threshold + 1, size=near_copies.size) if threshold
                else np.zeros(near_copies.size, int))
    phash[near_copies] = _flip_bits(phash[near_sources], distance, rng)
    phash[exact_copies] = phash[exact_sources]
    sha_raw[exact_copies] = sha_raw[exact_sources]
    sha256 = _hex(sha_raw)
    width = rng.integers(200, 2000, size=n_rows)
    height = rng.integers(200, 2000, size=n_rows)
    n_shards = -(-n_rows // shard_rows)
    index_digits = max(4, len(str(shard_rows - 1)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        rows = slice(shard * shard_rows, min(n_rows, (shard + 1) * shard_rows))
        count = rows.stop - rows.start
        keys = np.array([f"{shard:05d}{index:0{index_digits}d}".encode() for index in range(count)])
        captions = [f"a photo of thing {row % 997} number {row}" for row in range(rows.start, rows.stop)]
        table = pa.table({
            "key": _string_array(keys), "sha256": _string_array(sha256[rows]), "phash": pa.array(phash[rows]),
            "original_width": pa.array(width[rows]), "original_height": pa.array(height[rows]),
            "caption": pa.array(captions, pa.string()), "drop_reason": pa.nulls(count, pa.string())})
        path = folder / f"{shard:05d}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))

    def key_of(row: np.ndarray) -> np.ndarray:
        return np.array([f"{r // shard_rows:05d}{r % shard_rows:0{index_digits}d}" for r in row.tolist()])

    return {"paths": paths, "near": (key_of(near_sources), key_of(near_copies)),
            "exact": (key_of(exact_sources), key_of(exact_copies))}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _result_bytes(result) -> int:
    items = result if isinstance(result, list) else [result]
    return sum(int(getattr(item, "nbytes", 0) or 0) for item in items)


def _measured(name: str, fn, log_path: str):
    def wrapper(*args, **kwargs):
        try:  # reset this process's peak RSS, so VmHWM below is this task's own peak
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        start_kib = _status_kib("VmRSS")
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        line = {"name": name, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                "peak_kib": _status_kib("VmHWM"), "start_kib": start_kib, "shmem_kib": _status_kib("RssShmem"),
                "bytes": _result_bytes(result)}
        with open(log_path, "a") as log:
            log.write(json.dumps(line) + "\n")
        return result
    return wrapper


def _instrument(log_path: str) -> dict:
    import pipeline.dedup_tasks as tasks
    from pipeline import dedup

    originals = {name: getattr(tasks, name) for name in STEPS}
    for name, fn in originals.items():
        setattr(tasks, name, _measured(name, fn, log_path))
    originals["finish_group"] = dedup.finish_group
    dedup.finish_group = _measured("finish_group", dedup.finish_group, log_path)
    return originals


def _steps(log_path: str) -> dict:
    steps: dict[str, dict] = {}
    for line in Path(log_path).read_text().splitlines():
        item = json.loads(line)
        step = steps.setdefault(item["name"], {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0, "task_peak_mib": 0.0,
                                               "task_growth_mib": 0.0, "task_shmem_mib": 0.0, "result_mib": 0.0})
        step["calls"] += 1
        step["wall_s"] += item["wall"]
        step["cpu_s"] += item["cpu"]
        step["task_peak_mib"] = max(step["task_peak_mib"], item["peak_kib"] / 1024)
        step["task_growth_mib"] = max(step["task_growth_mib"], (item["peak_kib"] - item["start_kib"]) / 1024)
        step["task_shmem_mib"] = max(step["task_shmem_mib"], item["shmem_kib"] / 1024)
        step["result_mib"] += item["bytes"] / 2**20
    return {name: {key: round(value, 2) if isinstance(value, float) else value for key, value in step.items()}
            for name, step in steps.items()}


def _timed_distributed(paths: list[str], config: DedupConfig, log_path: str) -> tuple:
    from pipeline import dedup

    Path(log_path).unlink(missing_ok=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    table, counters = dedup.find_duplicates_distributed(paths, config)
    return table, counters, time.perf_counter() - start, load, _steps(log_path)


def run_one(n_rows: int, threshold: int, seed: int, num_cpus: int, workdir: Path, keep: bool) -> dict:
    config = DedupConfig(hamming_threshold=threshold)
    folder = workdir / f"rows{n_rows}_seed{seed}"
    planted = write_shards(n_rows, folder, threshold, seed)

    import ray

    from pipeline import dedup
    from pipeline.ray_adapter import init_ray

    init_ray(num_cpus=num_cpus)
    log_path = str(workdir / f"steps_{os.getpid()}.jsonl")
    _instrument(log_path)
    table, counters, cold_seconds, cold_load, steps = _timed_distributed(planted["paths"], config, log_path)
    driver_peak_distributed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    dedup.find_duplicates_in_driver(planted["paths"][:1], config, threads=num_cpus)  # one-time costs
    in_driver_load = os.getloadavg()[0]
    start = time.perf_counter()
    in_driver, in_driver_counters = dedup.find_duplicates_in_driver(planted["paths"], config, threads=num_cpus)
    in_driver_seconds = time.perf_counter() - start
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    same_result = in_driver.equals(table) and in_driver_counters == counters
    del in_driver

    warm_table, warm_counters, warm_seconds, warm_load, _ = _timed_distributed(planted["paths"], config, log_path)
    same_result = same_result and warm_table.equals(table) and warm_counters == counters
    ray.shutdown()

    keys = np.asarray(table["key"].to_numpy(zero_copy_only=False)).astype(str)
    cluster = np.asarray(table["cluster_id"].to_numpy(zero_copy_only=False)).astype(str)
    order = np.argsort(keys)

    def cluster_of(wanted: np.ndarray) -> np.ndarray:
        spots = np.searchsorted(keys[order], wanted)
        assert np.array_equal(keys[order][spots], wanted), "a planted key is missing from the result"
        return cluster[order][spots]

    found = {kind: int((cluster_of(planted[kind][0]) == cluster_of(planted[kind][1])).sum())
             for kind in ("near", "exact")}
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    store_mib = sum(step["result_mib"] for step in steps.values())
    return {
        "bench": "dedup_distributed", "rows": n_rows, "shards": len(planted["paths"]), "threshold": threshold,
        "tables": len(plan_tables(threshold, n_rows, config.tables)), "num_cpus": num_cpus,
        "distributed_seconds": round(cold_seconds, 2), "in_driver_seconds": round(in_driver_seconds, 2),
        "distributed_over_in_driver": round(cold_seconds / in_driver_seconds, 2),
        "distributed_warm_seconds": round(warm_seconds, 2),
        "warm_over_in_driver": round(warm_seconds / in_driver_seconds, 2),
        "same_table_and_counters": bool(same_result),
        "planted_near": int(planted["near"][0].size), "planted_near_found": found["near"],
        "planted_exact": int(planted["exact"][0].size), "planted_exact_found": found["exact"],
        "largest_task_peak_mib": max(step["task_peak_mib"] for step in steps.values()),
        "largest_task_growth_mib": max(step["task_growth_mib"] for step in steps.values()),
        "object_store_mib_written": round(store_mib, 1),
        "object_store_bytes_per_row": round(store_mib * 2**20 / n_rows, 1),
        "driver_peak_mib_before_in_driver": round(driver_peak_distributed / 1024, 1),
        "driver_peak_mib": round(driver_peak / 1024, 1),
        **counters, "steps": steps,
        "load_avg_1m": {"distributed": round(cold_load, 2), "in_driver": round(in_driver_load, 2),
                        "distributed_warm": round(warm_load, 2), "end": round(os.getloadavg()[0], 2)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000],
                        help="row counts; each runs in its own subprocess with a fresh Ray")
    parser.add_argument("--threshold", type=int, default=DedupConfig().hamming_threshold)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (and driver threads)")
    parser.add_argument("--workdir", default=None, help="where shards are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated shards")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a size is killed")
    parser.add_argument("--one", type=int, help="internal: run one size in this process")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.threshold, args.seed, args.num_cpus, Path(args.workdir),
                                 args.keep)), flush=True)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dedup_distributed_"))
    for size in args.rows:
        command = [sys.executable, os.path.abspath(__file__), "--one", str(size), "--threshold",
                   str(args.threshold), "--seed", str(args.seed), "--num-cpus", str(args.num_cpus),
                   "--workdir", str(workdir)] + (["--keep"] if args.keep else [])
        # Own session, so a timeout ends the run's Ray processes (raylet, workers) with it.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                 start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.communicate()
            print(json.dumps({"bench": "dedup_distributed", "rows": size, "failed": f"timeout {args.timeout} s"}))
            continue
        lines = [line for line in stdout.splitlines() if line.startswith('{"bench"')]
        if child.returncode or not lines:
            print(json.dumps({"bench": "dedup_distributed", "rows": size, "failed": f"exit {child.returncode}",
                              "stderr_tail": stderr[-2000:]}), flush=True)
            continue
        print(lines[-1], flush=True)
    if not args.workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
