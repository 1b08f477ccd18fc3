"""Scale of the Ray path of global dedup (`pipeline.dedup.find_duplicates_ray`) on synthetic shards.

Writes N rows as parquet shards shaped like the pipeline's (key, sha256, phash, original_width,
original_height, caption, drop_reason = null), with 1% planted near duplicates (the phash of an
earlier row of an earlier shard with 1..6 random bits flipped) and 0.1% planted exact duplicates
(same sha256 and phash as a row of an earlier shard). Then starts a local Ray as the pipeline does
(`pipeline.ray_adapter.init_ray` + `pipeline.build._size_shuffles`: task-based pull sort shuffle,
no progress bars; find_duplicates_ray picks its own partition counts), times `find_duplicates_ray`,
and checks that every planted pair ended in the same cluster. Then times the in-driver search
(`pipeline.dedup.find_duplicates_in_driver`, what the dedup stage runs up to
`single_machine_max_rows`) on the same shards and checks it gives the same table and counters.

Each (rows, tables_per_shuffle) run is its own subprocess with its own Ray, so ``ru_maxrss`` is
that run's driver peak. Prints one JSON line per run. Besides wall time and the counters, each run
reports where the time went: worker-side wall/CPU seconds summed over calls of ``_explode``
(records per table), ``_near_edges`` (the per-group pair search, of which ``bucket_pairs``) and
``_exact_edges``, the driver's read (``_read_rows``) and union-find/assembly (``_assemble``); the
rest of the wall time (``shuffle_seconds`` = wall - read - assemble, the functions above included)
is the shuffles. ``ray_processes_cpu_seconds`` is the CPU of every Ray process of the run (gcs,
raylet, workers; sampled from /proc each second), to set against the CPU spent inside those
functions: the difference is Ray Data (scheduling, shuffle, serialisation, spilling, worker
start-up). Also the largest worker RSS seen in those calls (plasma pages it touched included) and
the object store's spilling (from the raylet logs).

    .venv/bin/python bench/dedup_ray.py --rows 100000 1000000
    .venv/bin/python bench/dedup_ray.py --rows 1000000 --tables-per-shuffle 21
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
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

from filters.dedup import DedupConfig, plan_tables  # noqa: E402

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


# --- Timing of the steps inside find_duplicates_ray (patched in the driver, shipped to workers) ---

def _timed(name: str, fn, log_path: str, inner: dict | None = None):
    def wrapper(*args, **kwargs):
        if inner:  # time helpers that fn calls through its globals, in the worker that runs it
            for helper, helper_fn in inner.items():
                if not getattr(fn.__globals__.get(helper), "_bench_timed", False):
                    fn.__globals__[helper] = _timed(helper, helper_fn, log_path)
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        line = {"name": name, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                "pid": os.getpid(), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        with open(log_path, "a") as log:
            log.write(json.dumps(line) + "\n")
        return result
    wrapper._bench_timed = True
    return wrapper


def _instrument(log_path: str) -> None:
    import pipeline.dedup as dedup

    dedup._explode = _timed("explode", dedup._explode, log_path)
    dedup._near_edges = _timed("near_edges", dedup._near_edges, log_path,
                               inner={"bucket_pairs": dedup.bucket_pairs})
    dedup._exact_edges = _timed("exact_edges", dedup._exact_edges, log_path)
    dedup._read_rows = _timed("read_rows", dedup._read_rows, log_path)
    dedup._assemble = _timed("assemble", dedup._assemble, log_path)


def _phase_summary(log_path: str, driver_pid: int) -> tuple[dict, int]:
    phases: dict[str, dict] = {}
    worker_rss = 0
    if not os.path.exists(log_path):
        return phases, worker_rss
    for line in Path(log_path).read_text().splitlines():
        item = json.loads(line)
        phase = phases.setdefault(item["name"], {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0})
        phase["calls"] += 1
        phase["wall_s"] += item["wall"]
        phase["cpu_s"] += item["cpu"]
        if item["pid"] != driver_pid:
            worker_rss = max(worker_rss, item["maxrss_kib"])
    for phase in phases.values():
        phase["wall_s"], phase["cpu_s"] = round(phase["wall_s"], 2), round(phase["cpu_s"], 2)
    return phases, worker_rss


def _object_store() -> dict:
    """Object store size and spilling, from this session's raylet logs (the memory API needs grpc)."""
    import ray

    info: dict = {"capacity_mib": round(ray.cluster_resources().get("object_store_memory", 0) / 2**20)}
    try:
        logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
        spilled = [line.strip() for line in (logs / "raylet.out").read_text(errors="replace").splitlines()
                   if "Spilled " in line]
        info["raylet_spill_lines"] = len(spilled)
        info["last_spill_line"] = spilled[-1][-160:] if spilled else None
        # Periodic dump (every ~10 s), so it may trail the end of the run a little.
        for line in (logs / "debug_state.txt").read_text(errors="replace").splitlines():
            if "cumulative spill requests" in line or "cumulative restore requests" in line:
                name, _, value = line.strip("- ").partition(":")
                info[name.strip().replace(" ", "_")] = int(value)
    except Exception as error:  # noqa: BLE001 (optional figure)
        info["error"] = repr(error)
    return info


class TreeCpu:
    """CPU seconds of this process's descendants (Ray's gcs, raylet and workers), sampled from /proc.

    Each pid's last seen utime+stime is kept, so a worker that exits loses at most one interval.
    """

    def __init__(self, interval: float = 1.0) -> None:
        import threading

        self.interval, self.tick = interval, os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, float] = {}
        self.baseline = self._sample()
        self.seen.clear()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[int, float]:
        parent, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / self.tick
        me, tree = os.getpid(), set()
        for pid in parent:
            walk = pid
            while walk in parent and walk not in (me, 0, 1):
                walk = parent[walk]
            if walk == me and pid != me:
                tree.add(pid)
        for pid in tree:
            self.seen[pid] = cpu[pid]
        return {pid: cpu[pid] for pid in tree}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(value - self.baseline.get(pid, 0.0) for pid, value in self.seen.items())


def run_one(n_rows: int, tables_per_shuffle: int | None, records_per_group: int, threshold: int,
            seed: int, num_cpus: int, workdir: Path, keep: bool) -> dict:
    config = DedupConfig(hamming_threshold=threshold)
    folder = workdir / f"rows{n_rows}_seed{seed}"
    start = time.perf_counter()
    planted = write_shards(n_rows, folder, threshold, seed)
    generate_seconds = time.perf_counter() - start

    import ray

    from pipeline.build import _size_shuffles
    from pipeline.ray_adapter import init_ray

    start = time.perf_counter()
    init_ray(num_cpus=num_cpus)
    _size_shuffles(len(planted["paths"]))
    init_seconds = time.perf_counter() - start
    log_path = str(workdir / f"phases_{os.getpid()}.jsonl")
    _instrument(log_path)

    import pipeline.dedup as dedup

    tree_cpu = TreeCpu()
    start, cpu = time.perf_counter(), time.process_time()
    table, counters = dedup.find_duplicates_ray(planted["paths"], config, records_per_group=records_per_group,
                                                tables_per_shuffle=tables_per_shuffle)
    seconds, driver_cpu = time.perf_counter() - start, time.process_time() - cpu
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray_cpu = tree_cpu.stop()
    spill = _object_store()
    ray.shutdown()

    # The peer in the same run: the in-driver search the dedup stage uses up to
    # single_machine_max_rows, on the same shards (after the shuffle, so its memory does not mix in).
    dedup.find_duplicates_in_driver(planted["paths"][:1], config, threads=num_cpus)  # one-time costs
    start = time.perf_counter()
    in_driver, in_driver_counters = dedup.find_duplicates_in_driver(planted["paths"], config, threads=num_cpus)
    in_driver_seconds = time.perf_counter() - start
    same_result = (in_driver.sort_by("key").equals(table.sort_by("key"))
                   and in_driver_counters == counters)

    keys = np.asarray(table["key"].to_numpy(zero_copy_only=False)).astype(str)
    cluster = np.asarray(table["cluster_id"].to_numpy(zero_copy_only=False)).astype(str)
    order = np.argsort(keys)

    def cluster_of(wanted: np.ndarray) -> np.ndarray:
        spots = np.searchsorted(keys[order], wanted)
        assert np.array_equal(keys[order][spots], wanted), "a planted key is missing from the result"
        return cluster[order][spots]

    found = {}
    for kind in ("near", "exact"):
        sources, copies = planted[kind]
        found[kind] = int((cluster_of(sources) == cluster_of(copies)).sum())
    n_tables = len(plan_tables(threshold, n_rows, config.tables))
    wave = n_tables if tables_per_shuffle is None else max(1, min(tables_per_shuffle, n_tables))
    phases, worker_rss = _phase_summary(log_path, os.getpid())
    accounted = sum(phases.get(name, {}).get("wall_s", 0.0) for name in ("read_rows", "assemble"))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "bench": "dedup_ray", "rows": n_rows, "shards": len(planted["paths"]), "threshold": threshold,
        "tables": n_tables, "tables_per_shuffle": tables_per_shuffle, "waves": -(-n_tables // wave),
        "records_per_group": records_per_group, "num_cpus": num_cpus,
        "seconds": round(seconds, 2), "driver_cpu_seconds": round(driver_cpu, 2),
        "in_driver_seconds": round(in_driver_seconds, 2), "in_driver_same_result": bool(same_result),
        "shuffle_over_in_driver": round(seconds / in_driver_seconds, 1),
        "ray_processes_cpu_seconds": round(ray_cpu, 1),
        "shuffle_seconds": round(seconds - accounted, 2),
        "generate_seconds": round(generate_seconds, 2), "ray_init_seconds": round(init_seconds, 2),
        "driver_peak_mib": round(driver_peak / 1024, 1), "worker_peak_mib": round(worker_rss / 1024, 1),
        "planted_near": int(planted["near"][0].size), "planted_near_found": found["near"],
        "planted_exact": int(planted["exact"][0].size), "planted_exact_found": found["exact"],
        **counters, "phases": phases, "object_store": spill,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="row counts; each runs in its own subprocess with a fresh Ray")
    parser.add_argument("--tables-per-shuffle", default="None",
                        help="tables per shuffle wave: an int, or None for all tables in one shuffle")
    parser.add_argument("--records-per-group", type=int, default=1 << 20,
                        help="records per map_groups call (find_duplicates_ray's default: 1<<20)")
    parser.add_argument("--threshold", type=int, default=DedupConfig().hamming_threshold)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--workdir", default=None, help="where shards are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated shards")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a run is killed")
    parser.add_argument("--one", type=int, help="internal: run one size in this process")
    args = parser.parse_args(argv)
    per_shuffle = (None if args.tables_per_shuffle in (None, "None", "none", "")
                   else int(args.tables_per_shuffle))
    if args.one:
        print(json.dumps(run_one(args.one, per_shuffle, args.records_per_group, args.threshold, args.seed,
                                 args.num_cpus, Path(args.workdir), args.keep)), flush=True)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dedup_ray_"))
    for size in args.rows:
        command = [sys.executable, os.path.abspath(__file__), "--one", str(size), "--tables-per-shuffle",
                   str(per_shuffle), "--records-per-group", str(args.records_per_group), "--threshold",
                   str(args.threshold), "--seed", str(args.seed), "--num-cpus", str(args.num_cpus),
                   "--workdir", str(workdir)] + (["--keep"] if args.keep else [])
        start = time.perf_counter()
        # Own session, so a timeout can end the run's Ray processes (raylet, workers) with it.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO, start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            print(json.dumps({"bench": "dedup_ray", "rows": size, "tables_per_shuffle": per_shuffle,
                              "failed": f"timeout after {args.timeout} s"}), flush=True)
            continue
        lines = [line for line in stdout.splitlines() if line.startswith('{"bench"')]
        if child.returncode or not lines:
            print(json.dumps({"bench": "dedup_ray", "rows": size, "tables_per_shuffle": per_shuffle,
                              "failed": f"exit {child.returncode} after {time.perf_counter() - start:.1f} s",
                              "stderr_tail": stderr[-2000:]}), flush=True)
            continue
        print(lines[-1], flush=True)
    if not args.workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
