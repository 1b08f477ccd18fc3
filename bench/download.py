"""Our download stage against the `img2dataset` command, on the same loopback-served URL list.

The 1,000 Flickr8k photos are served by `pipeline.testweb.serve_web` (in this process, one thread per
connection, listen backlog raised to `--backlog`) under `--urls` distinct URLs (`/img/NAME?v=N`; the
server ignores the query), each with one of the photos' captions. Both downloaders get the same
settings: resize to 256 (keep_ratio, only if bigger), JPEG q95, WebDataset shards of `--shard-size`,
sha256, no EXIF, the same X-Robots-Tag directives and user agent, timeout, no retries, `--threads`
threads per worker and one worker per core (Ray runs one download actor per CPU; img2dataset gets
`processes_count` = cores, multiprocessing).

"Ours" is what `filip build` runs: the input stage (`prepare_input`) then `DownloadStage` through the
Ray adapter (`run_stage`) on a local Ray, with the address guard on (`allow_networks:
[127.0.0.1/32]`, every connection checked) and the stage's default bounds (deadline, body and
pixel caps). Its images/s is over the download stage's wall clock;
the input stage and Ray's start are timed apart. "img2dataset" is the wall clock of the CLI run as
a subprocess (start-up and its own reading of the URL list included). Ray is shut down while
img2dataset runs, so neither competes with the other's idle processes. `span_seconds` (both) is
first shard start to last shard end from img2dataset's `*_stats.json`: the downloading alone.
Prints one JSON line (progress on stderr).

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python bench/download.py --urls 5000 --repeats 2
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations asks PyPI

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.web.address import AddressPolicy
from pipeline import testweb
from pipeline.config import config_from_dict
from pipeline.download import DownloadStage
from pipeline.input import prepare_input
from pipeline.ray_adapter import init_ray, run_stage
from pipeline.storage import Storage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k"
DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


def write_url_list(base: str, data: Path, n_urls: int, path: Path) -> None:
    """`n_urls` distinct URLs over the photos, cycling through captions.csv (5 captions a photo)."""
    with open(data / "captions.csv", newline="") as handle:
        pairs = [(row["image"], row["caption"]) for row in csv.DictReader(handle)]
    rows = [pairs[i % len(pairs)] for i in range(n_urls)]
    urls = [f"{base}/img/{image}?v={i}" for i, (image, _) in enumerate(rows)]
    pq.write_table(pa.table({"url": urls, "caption": [caption for _, caption in rows]}), path)


@contextmanager
def serve_images(folder: Path, backlog: int) -> Iterator[str]:
    """`testweb.serve_web` with a listen backlog of `backlog` (0: http.server's own, 5).

    With 2 x 64 threads connecting at once, a backlog of 5 overflows: the kernel drops SYNs, the
    client resends after 1, 3, 7, 15 s, and some requests pass the 10 s timeout. That measures the
    test server, not the downloaders, and hits whichever starts its threads in a tighter burst.
    """
    with testweb.serve_web(folder, backlog=backlog or 5) as base:
        yield base


def run_ours(url_list: Path, work: Path, settings: dict) -> dict:
    import ray

    output = str(work / "ours")
    config = config_from_dict({
        "run": {"input": str(url_list), "output": output, "shard_size": settings["shard_size"]},
        "download": {"allow_networks": ["127.0.0.1/32"], "image_size": 256, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
                     "encode_quality": 95, "thread_count": settings["threads"],
                     "timeout": settings["timeout"], "retries": 0,
                     "disallowed_header_directives": DIRECTIVES},
    })
    storage = Storage(output)
    storage.makedirs("")
    start = time.perf_counter()
    shards, _ = prepare_input(config.run, storage, AddressPolicy.from_strings(config.download.allow_networks))
    input_seconds = time.perf_counter() - start
    start = time.perf_counter()
    init_ray(num_cpus=settings["cpus"])
    ray_seconds = time.perf_counter() - start
    try:
        # The same stage object `pipeline_stages()` builds for `filip build`.
        stage = DownloadStage(output, config.download, config.run.shard_size)
        start = time.perf_counter()
        stats = run_stage(stage, shards, progress=lambda message: None)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"ok": sum(s.rows_out for s in stats), "rows": sum(s.rows_in for s in stats),
            "seconds": round(seconds, 2), "input_seconds": round(input_seconds, 2),
            "ray_start_seconds": round(ray_seconds, 2), "shards": len(shards),
            **_outcomes(f"{output}/download")}


def run_img2dataset(url_list: Path, work: Path, settings: dict) -> dict:
    output = work / "img2dataset"
    command = [
        str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(url_list),
        "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_folder", str(output), "--output_format", "webdataset",
        "--image_size", "256", "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
        "--encode_quality", "95", "--encode_format", "jpg", "--extract_exif", "False",
        "--number_sample_per_shard", str(settings["shard_size"]), "--compute_hash", "sha256",
        "--disallowed_header_directives", json.dumps(DIRECTIVES), "--user_agent_token", "filip-corpus",
        "--timeout", str(settings["timeout"]), "--retries", "0", "--thread_count", str(settings["threads"]),
        "--processes_count", str(settings["cpus"]), "--distributor", "multiprocessing",
        "--enable_wandb", "False",
    ]
    log_path = work / "img2dataset.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"img2dataset exited {result.returncode}:\n{log_path.read_text()[-3000:]}")
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(f"{output}/*_stats.json")]
    return {"ok": sum(s["successes"] for s in stats), "rows": sum(s["count"] for s in stats),
            "seconds": round(seconds, 2), "shards": len(stats), **_outcomes(str(output))}


def _outcomes(folder: str) -> dict:
    """From img2dataset's files in `folder`: the sorted sha256 of the successful rows (the two runs
    must fetch the same bytes), the count of each error message, and the span from the first
    shard's start to the last shard's end (the downloading, without process start and stop)."""
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(f"{folder}/*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    tables = [pq.read_table(p, columns=["status", "sha256", "error_message"])
              for p in sorted(glob.glob(f"{folder}/*.parquet"))]
    table = pa.concat_tables(tables)
    ok = pc.equal(table["status"], "success")
    errors = Counter(table.filter(pc.invert(ok))["error_message"].to_pylist())
    return {"sha256": sorted(table.filter(ok)["sha256"].to_pylist()),
            "errors": dict(errors.most_common(5)), "span_seconds": round(span, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with images/ and captions.csv")
    parser.add_argument("--urls", type=int, default=5000, help="distinct URLs (at least 5,000 for the issue)")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per download shard, both tools")
    parser.add_argument("--threads", type=int, default=64, help="download threads per worker (our default)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per request (our default)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="Ray CPUs = img2dataset processes_count (default: the machine's cores)")
    parser.add_argument("--backlog", type=int, default=1024,
                        help="listen backlog of the loopback server (0: http.server's 5)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the order alternates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = {"shard_size": args.shard_size, "threads": args.threads, "timeout": args.timeout,
                "cpus": args.cpus, "server_backlog": args.backlog}
    runs: dict[str, list[dict]] = {"ours": [], "img2dataset": []}
    runners = {"ours": run_ours, "img2dataset": run_img2dataset}
    with (serve_images(args.data / "images", args.backlog) as base,
          tempfile.TemporaryDirectory(prefix="bench-dl-") as tmp):
        url_list = Path(tmp) / "urls.parquet"
        write_url_list(base, args.data, args.urls, url_list)
        for repeat in range(args.repeats):
            order = ["ours", "img2dataset"] if repeat % 2 == 0 else ["img2dataset", "ours"]
            for name in order:
                with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=tmp) as work:
                    result = runners[name](url_list, Path(work), settings)
                print(f"[{name}] repeat {repeat}: {result['ok']}/{result['rows']} ok in "
                      f"{result['seconds']} s", file=sys.stderr)
                runs[name].append(result)
    report: dict = {"bench": "download", "urls": args.urls, "settings": settings | {
        "image_size": 256, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
        "encode_quality": 95, "output_format": "webdataset", "compute_hash": "sha256", "retries": 0,
        "disallowed_header_directives": DIRECTIVES, "img2dataset_distributor": "multiprocessing"}}
    for name, results in runs.items():
        best = min(results, key=lambda r: r["seconds"])
        report[name] = {
            "ok": [r["ok"] for r in results], "errors": [r["errors"] for r in results],
            "seconds": [r["seconds"] for r in results],
            "span_seconds": [r["span_seconds"] for r in results],
            "images_per_s": [round(r["ok"] / r["seconds"], 1) for r in results],
            "best_images_per_s": round(best["ok"] / best["seconds"], 1)}
        if name == "ours":
            report[name]["input_seconds"] = [r["input_seconds"] for r in results]
            report[name]["ray_start_seconds"] = [r["ray_start_seconds"] for r in results]
    ours, theirs = runs["ours"], runs["img2dataset"]
    report["ratio"] = [round((o["ok"] / o["seconds"]) / (t["ok"] / t["seconds"]), 3)
                       for o, t in zip(ours, theirs)]
    report["ratio_with_input_stage"] = [
        round((o["ok"] / (o["seconds"] + o["input_seconds"])) / (t["ok"] / t["seconds"]), 3)
        for o, t in zip(ours, theirs)]
    report["ratio_with_input_and_ray_start"] = [
        round((o["ok"] / (o["seconds"] + o["input_seconds"] + o["ray_start_seconds"]))
              / (t["ok"] / t["seconds"]), 3) for o, t in zip(ours, theirs)]
    report["ratio_in_shard_span"] = [
        round((o["ok"] / o["span_seconds"]) / (t["ok"] / t["span_seconds"]), 3)
        for o, t in zip(ours, theirs)]
    report["ratio_best"] = round(report["ours"]["best_images_per_s"]
                                 / report["img2dataset"]["best_images_per_s"], 3)
    report["same_ok_counts"] = all(o["ok"] == t["ok"] for o, t in zip(ours, theirs))
    report["same_sha256"] = all(o["sha256"] == t["sha256"] for o, t in zip(ours, theirs))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
