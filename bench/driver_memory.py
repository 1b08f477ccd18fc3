"""The driver's peak memory in the steps after the stages (decisions, final shards), at two sizes.

For each size, one child process writes a synthetic finished run (`pipeline/fakerun.py`: input
shards, download tars of small JPEGs, inspect files, rejected rows), and a second, fresh child is
the driver: it starts a local Ray instance, then writes `decisions/` and the final shards exactly
as `filip build` does (same functions, same defaults), and reports its own peak RSS (ru_maxrss:
the driver process only; Ray's workers are other processes). The peer, in a third child: the
earlier design's driver, which held every decision row in one table.

Dedup is left out: its in-driver search holds ~290 B per hash by design (issue 13), so it would
measure the search, not these steps; the distributed search is `bench/dedup_distributed.py`.

    .venv/bin/python bench/driver_memory.py --sizes 200000 2000000
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def generate(output: str, rows: int, shard_size: int) -> None:
    from pipeline.fakerun import write_fake_run

    start = time.perf_counter()
    kept = write_fake_run(output, rows, shard_size)
    Path(output, "kept.json").write_text(json.dumps(kept))
    print(json.dumps({"generate_seconds": round(time.perf_counter() - start, 1)}))


def drive(output: str, samples_per_shard: int, cpus: int) -> None:
    import ray

    from pipeline.config import config_from_dict
    from pipeline.decisions import write_decisions
    from pipeline.fakerun import STAGES
    from pipeline.run_folder import record_config
    from pipeline.shards import write_final_shards
    from pipeline.storage import Storage

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    started = _peak_mib()
    storage = Storage(output)
    kept = json.loads(storage.read_bytes("kept.json"))
    config = config_from_dict({"run": {"input": "urls.csv", "output": output},
                               "shards": {"samples_per_shard": samples_per_shard}})
    record_config(config, storage)
    quiet = lambda msg: None  # noqa: E731
    decisions = write_decisions(storage, STAGES, list(kept), quiet)
    final, shards = write_final_shards(storage, config, "inspect", kept, quiet)
    print(json.dumps({"peak_mib": round(_peak_mib(), 1), "after_ray_start_mib": round(started, 1),
                      "decisions_seconds": round(decisions.seconds, 1), "shards_seconds": round(shards.seconds, 1),
                      "decision_rows": decisions.rows_in, "final_shards": final["shards"],
                      "samples": final["samples"]}))


def one_table(output: str) -> None:
    """The peer: every decision row in one driver table, as the earlier `decisions.parquet` writer held."""
    import pyarrow as pa

    from pipeline.storage import Storage

    storage = Storage(output)
    before = _peak_mib()
    table = pa.concat_tables([storage.read_parquet(rel) for rel in storage.glob("decisions/*.parquet")])
    table = table.sort_by("row_id")
    print(json.dumps({"peak_mib": round(_peak_mib(), 1), "before_mib": round(before, 1), "rows": table.num_rows}))


def _child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the synthetic runs go (default: a temporary folder)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, output, *rest = args.child
        {"generate": lambda: generate(output, int(rest[0]), int(rest[1])),
         "drive": lambda: drive(output, int(rest[0]), int(rest[1])),
         "one_table": lambda: one_table(output)}[role]()
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="driver-memory-"))
    results = []
    for rows in args.sizes:
        output = str(workdir / f"run-{rows}")
        made = _child("--child", "generate", output, str(rows), str(args.shard_size))
        start = time.perf_counter()
        driven = _child("--child", "drive", output, str(args.samples_per_shard), str(args.cpus))
        wall = time.perf_counter() - start
        peer = _child("--child", "one_table", output)
        results.append({"rows": rows, "driver_peak_mib": driven["peak_mib"],
                        "driver_after_ray_start_mib": driven["after_ray_start_mib"],
                        "peer_one_table_peak_mib": peer["peak_mib"], "peer_before_mib": peer["before_mib"],
                        "wall_seconds": round(wall, 1), **{k: v for k, v in driven.items() if "mib" not in k},
                        **made})
        shutil.rmtree(output, ignore_errors=True)
    first, last = results[0], results[-1]
    print(json.dumps({
        "bench": "driver_memory", "sizes": args.sizes, "cpus": args.cpus, "results": results,
        "driver_peak_ratio": round(last["driver_peak_mib"] / first["driver_peak_mib"], 3),
        "peer_peak_ratio": round(last["peer_one_table_peak_mib"] / first["peer_one_table_peak_mib"], 3),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3]}))


if __name__ == "__main__":
    main()
