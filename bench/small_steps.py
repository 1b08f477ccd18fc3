"""Where a small run's decisions and final shards are cheaper: in the driver or as Ray tasks.

On a synthetic finished run (`pipeline/fakerun.py`) of each size, in one process with a fresh local
Ray instance: the final shards cut in the driver, then as Ray tasks on a copy (the first Ray work of
the instance, as after the stages' actors are gone), then as Ray tasks again on another copy (warm
workers); the same for decisions/ with shards of `--shard-size` rows. Prints one JSON line with
seconds and the ratios Ray / driver, which set `DRIVER_MAX_ROWS` and `DRIVER_MAX_SHARDS`.

    .venv/bin/python bench/small_steps.py --sizes 2000 20000
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _final_shards(output: str, kept: dict[str, int], **limits: int) -> float:
    from pipeline.config import config_from_dict
    from pipeline.run_folder import record_config
    from pipeline.shards import write_final_shards
    from pipeline.storage import Storage

    storage = Storage(output)
    config = config_from_dict({"run": {"input": "urls.csv", "output": output}})  # 10,000 samples a shard
    record_config(config, storage)
    start = time.perf_counter()
    write_final_shards(storage, config, "inspect", kept, lambda msg: None, **limits)
    return time.perf_counter() - start


def _decisions(output: str, shards: list[str], **limits: int) -> float:
    from pipeline.decisions import write_decisions
    from pipeline.fakerun import STAGES
    from pipeline.storage import Storage

    start = time.perf_counter()
    write_decisions(Storage(output), STAGES, shards, lambda msg: None, **limits)
    return time.perf_counter() - start


def measure(workdir: Path, rows: int, shard_size: int) -> dict:
    from pipeline.fakerun import write_fake_run

    source = workdir / f"run-{rows}"
    kept = write_fake_run(str(source), rows, shard_size)
    copies = {name: shutil.copytree(source, workdir / f"{name}-{rows}") for name in ("cold", "warm")}
    result = {"rows": rows, "shards": len(kept),
              "shards_driver_s": _final_shards(str(source), kept),
              "shards_ray_cold_s": _final_shards(str(copies["cold"]), kept, driver_max_rows=0),
              "shards_ray_warm_s": _final_shards(str(copies["warm"]), kept, driver_max_rows=0),
              "decisions_driver_s": _decisions(str(source), list(kept)),
              "decisions_ray_s": _decisions(str(copies["cold"]), list(kept), driver_max_shards=0)}
    for path in [source, *copies.values()]:
        shutil.rmtree(path)
    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    result["shards_ray_warm_over_driver"] = round(result["shards_ray_warm_s"] / result["shards_driver_s"], 2)
    result["decisions_ray_over_driver"] = round(result["decisions_ray_s"] / result["decisions_driver_s"], 2)
    return result


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--shard-size", type=int, default=1_000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="small-steps-"))
    results = []
    for rows in args.sizes:  # a fresh Ray instance per size: "cold" is the instance's first task
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        results.append(measure(workdir, rows, args.shard_size))
        ray.shutdown()
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"bench": "small_steps", "cpus": args.cpus, "shard_size": args.shard_size,
                      "results": results, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}))


if __name__ == "__main__":
    main()
