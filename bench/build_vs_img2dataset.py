"""`filip build` (download path only) against the `img2dataset` command, as whole commands.

Web: the 1,000 Flickr8k photos upscaled to 640-1,280 px (bench/webimages.py), served on 127.0.0.1
from a separate process, under `--urls` distinct URLs. Both commands get the same URL list and
settings: resize to 256 (keep_ratio, only if bigger), JPEG q95, `--shard-size` rows per shard,
sha256, the same X-Robots-Tag directives and user agent, `--timeout`, no retries, `--threads`
threads per worker and one worker per core (Ray: one download actor per CPU; img2dataset:
`processes_count` = cores, multiprocessing).

(a) `filip build CONFIG` with `stages: [download]` (`--stages`; `download,inspect` adds the
    inspect stage: decode, pHash, resolution and caption filters) and
    `download.allow_networks: [127.0.0.1/32]`. The input stage, decisions/ and the final shards
    (re-sharded WebDataset and Parquet: work img2dataset does not do) always run too; the output's
    `stages_run` lists what ran.
(b) the `img2dataset` CLI on the same list.

Each command is one subprocess, measured by bench/proctree.py from start to exit: wall clock,
peak RSS summed over its whole process tree (Ray's gcs_server, raylet and workers are the
driver's descendants; img2dataset's pool processes its own), CPU of the tree (sampled: the driver
does not wait for all of Ray's processes, so RUSAGE_CHILDREN misses most of their CPU). Runs alternate
A B A B ... (`--repeats` pairs). Headline: `ratio` = median img2dataset wall / median filip wall
(>= 1.0: filip build is faster as a command). The build's phases (from its progress lines) and
stats.json's stage seconds are extra columns. Prints one JSON line (progress on stderr).

    .venv/bin/python bench/build_vs_img2dataset.py --urls 2000 --repeats 5
    .venv/bin/python bench/build_vs_img2dataset.py --urls 20000 --repeats 3
    .venv/bin/python bench/build_vs_img2dataset.py --urls 2000 --repeats 3 --stages download,inspect
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations asks PyPI

import filipbuild
import webimages
from proctree import CommandRun, run_measured

DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
IMG2DATASET = str(Path(sys.executable).parent / "img2dataset")


def build_config(url_list: Path, output: Path, settings: dict) -> dict:
    return {
        "run": {"input": str(url_list), "output": str(output), "shard_size": settings["shard_size"]},
        "download": {"image_size": 256, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
                     "encode_format": "jpg", "encode_quality": 95, "thread_count": settings["threads"],
                     "timeout": settings["timeout"], "retries": 0, "allow_networks": ["127.0.0.1/32"],
                     "user_agent_token": "filip-corpus", "disallowed_header_directives": DIRECTIVES},
        "stages": settings["stages"],
    }


def img2dataset_command(url_list: Path, output: Path, settings: dict) -> list[str]:
    return [
        IMG2DATASET, "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_folder", str(output), "--output_format", "webdataset",
        "--image_size", "256", "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
        "--encode_quality", "95", "--encode_format", "jpg", "--extract_exif", "False",
        "--number_sample_per_shard", str(settings["shard_size"]), "--compute_hash", "sha256",
        "--disallowed_header_directives", json.dumps(DIRECTIVES), "--user_agent_token", "filip-corpus",
        "--timeout", str(settings["timeout"]), "--retries", "0", "--thread_count", str(settings["threads"]),
        "--processes_count", str(settings["cpus"]), "--distributor", "multiprocessing", "--enable_wandb", "False"]


def downloaded(folder: Path) -> dict:
    """From img2dataset-format files in `folder`: successes, the sorted sha256 of the bodies, and
    the most common error messages."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = sorted(glob.glob(f"{folder}/*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=["status", "sha256", "error_message"]) for p in paths])
    ok = pc.equal(table["status"], "success")
    errors = Counter(table.filter(pc.invert(ok))["error_message"].to_pylist())
    return {"ok": int(pc.sum(ok).as_py() or 0), "rows": table.num_rows,
            "sha256": sorted(table.filter(ok)["sha256"].to_pylist()), "errors": dict(errors.most_common(3))}


def run_filip(url_list: Path, work: Path, settings: dict) -> tuple[CommandRun, dict]:
    output = work / "out"
    config = filipbuild.write_config(work / "build.yaml", build_config(url_list, output, settings))
    run = filipbuild.run_build(config, work)
    stats = filipbuild.stage_stats(output)
    extra = {"phases_seconds": filipbuild.phases(run), "phases_cpu_seconds": filipbuild.phase_cpu(run),
             "stages_run": [name for name, s in stats["stages"].items() if not s["skipped"]]
             + list(stats["steps"]), "stats_json": stats, "cpu_by_process": run.cpu_by_name}
    return run, {**downloaded(output / "download"), **extra}


def run_img2dataset(url_list: Path, work: Path, settings: dict) -> tuple[CommandRun, dict]:
    output = work / "out"
    log = work / "img2dataset.log"
    run = run_measured(img2dataset_command(url_list, output, settings), log, keep=lambda line: False)
    if run.returncode != 0:
        raise RuntimeError(f"img2dataset exited {run.returncode}:\n{log.read_text()[-3000:]}")
    return run, downloaded(output)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "all": [round(v, 2) for v in values]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=webimages.DATA, help="folder with images/ and captions.csv")
    parser.add_argument("--urls", type=int, default=2000, help="distinct URLs (the issue: 2,000 and 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs, A B A B ...")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per download shard, both tools")
    parser.add_argument("--threads", type=int, default=64, help="download threads per worker (our default)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per request (our default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photos' upscaled sizes")
    parser.add_argument("--stages", default="download",
                        help="the build's stages, comma-separated (download; download,inspect)")
    args = parser.parse_args(argv)
    settings = {"shard_size": args.shard_size, "threads": args.threads, "timeout": args.timeout,
                "cpus": os.cpu_count() or 1, "stages": args.stages.split(",")}
    tools = {"filip_build": run_filip, "img2dataset": run_img2dataset}
    runs: dict[str, list[tuple[CommandRun, dict]]] = {name: [] for name in tools}
    photos = webimages.web_photos(args.data, args.seed)
    with webimages.served(photos) as base, tempfile.TemporaryDirectory(prefix="bench-build-i2d-") as tmp:
        url_list = Path(tmp) / "urls.parquet"
        webimages.write_url_list(base, args.data, args.urls, url_list)
        for repeat in range(args.repeats):
            for name, runner in tools.items():
                work = Path(tmp) / f"{name}-{repeat}"
                work.mkdir()
                run, outcome = runner(url_list, work, settings)
                shutil.rmtree(work)
                runs[name].append((run, outcome))
                print(f"[{name}] repeat {repeat}: {outcome['ok']}/{outcome['rows']} ok, "
                      f"{run.wall_seconds:.1f} s, peak {run.peak_rss_bytes / 2**20:.0f} MiB, "
                      f"load {run.load_start[0]}-{run.load_end[0]}", file=sys.stderr)
    report: dict = {"bench": "build_vs_img2dataset", "urls": args.urls, "repeats": args.repeats,
                    "order": "filip_build, img2dataset, filip_build, ...", "settings": settings | {
                        "image_size": 256, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
                        "encode_quality": 95, "compute_hash": "sha256", "retries": 0},
                    "web": webimages.photo_sizes(photos)}
    for name, results in runs.items():
        report[name] = {
            "wall_seconds": spread([r.wall_seconds for r, _ in results]),
            "peak_rss_mib": spread([r.peak_rss_bytes / 2**20 for r, _ in results]),
            # Sampled: Ray's processes are not all waited for by the driver, so rusage misses them.
            "cpu_seconds": spread([r.sampled_cpu_seconds for r, _ in results]),
            "rusage_cpu_seconds": [round(r.rusage_cpu_seconds, 2) for r, _ in results],
            "ok": [o["ok"] for _, o in results], "errors": [o["errors"] for _, o in results],
            "load_start_end": [[r.load_start[0], r.load_end[0]] for r, _ in results],
            "peak_processes": [r.peak_processes for r, _ in results],
            "process_names": results[0][0].process_names, "first_seen": results[0][0].first_seen,
            "left_running": sorted({p for r, _ in results for p in r.left_running})}
    ours = report["filip_build"]
    ours["phases_seconds"] = [o["phases_seconds"] for _, o in runs["filip_build"]]
    ours["phases_cpu_seconds"] = [o["phases_cpu_seconds"] for _, o in runs["filip_build"]]
    ours["stages_run"] = runs["filip_build"][0][1]["stages_run"]
    ours["stats_json"] = [o["stats_json"] for _, o in runs["filip_build"]]
    walls = {name: [r.wall_seconds for r, _ in results] for name, results in runs.items()}
    report["ratio"] = round(statistics.median(walls["img2dataset"]) / statistics.median(walls["filip_build"]), 3)
    report["ratio_per_pair"] = [round(t / o, 3) for o, t in zip(walls["filip_build"], walls["img2dataset"])]
    report["peak_memory_ratio"] = round(report["filip_build"]["peak_rss_mib"]["median"]
                                        / report["img2dataset"]["peak_rss_mib"]["median"], 3)
    report["same_sha256"] = all(a["sha256"] == b["sha256"]
                                for (_, a), (_, b) in zip(runs["filip_build"], runs["img2dataset"]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
