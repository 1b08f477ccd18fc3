"""A full `filip build` (every stage) against a single-process loop doing the same per-image work.

Web: the 1,000 Flickr8k photos upscaled to 640-1,280 px (bench/webimages.py), served on 127.0.0.1
from a separate process, under `--urls` URLs (each photo twice at 2,000: the dedup stage has
exact duplicates to drop). One config for both: download (as in bench/build_vs_img2dataset.py),
inspect, dedup, unsafe and back-translation on, `--shard-size` rows per shard. Back-translation
uses the Helsinki-NLP opus-mt models when they are in the local Hugging Face cache; otherwise tiny
random-weight MarianMT models that this benchmark builds (filters/backtranslation/tiny_models.py,
batch 64, at most 32 new tokens, as `filip demo` uses them): the output says which (`models`).

(a) `filip build CONFIG`; (b) `bench/build_loop.py --config CONFIG` (one process: a fetch thread
pool, then each stage's work in turn, onnxruntime and torch on one thread). Both are whole
commands measured by bench/proctree.py: wall clock and CPU seconds (core-seconds) of the whole
process tree, start to exit, imports and Ray's start included. Per stage: for the build, the
phases cut at its progress lines and the tree's CPU in each (`phases_*`), and stats.json's
per-shard seconds; for the loop, each stage's wall and process CPU. Targets (issue 15):
`cpu_ratio` = build core-seconds / loop core-seconds <= 1.2, `wall_ratio` = build wall / loop
wall < 1. Runs alternate build, loop, build, ... (`--repeats` pairs). Prints one JSON line.

    .venv/bin/python bench/build.py --urls 2000 --repeats 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import filipbuild
import webimages
from build_vs_img2dataset import build_config
from proctree import CommandRun, run_measured

from pipeline.config import DEFAULT_STAGES

LOOP = str(Path(__file__).resolve().parent / "build_loop.py")


def _build_tiny_models(folder: str, captions: list[str]) -> dict[str, str]:
    from filters.backtranslation.tiny_models import build_tiny_marian_models

    return build_tiny_marian_models(Path(folder), captions)


def translation_models(data: Path) -> tuple[str, dict]:
    """('opus-mt', {}) when the real models are cached here, else ('tiny', their folders): built
    once (in a child process, so this one stays free of torch) and reused from the temp folder."""
    from filters.backtranslation import (
        BackTranslationConfig,
        MissingModelError,
        check_models,
    )

    try:
        check_models(BackTranslationConfig())
        return "opus-mt (Helsinki-NLP, local Hugging Face cache)", {}
    except MissingModelError:
        pass
    folder = Path(tempfile.gettempdir()) / "filip-bench-tiny-marian"
    marker = folder / "models.json"
    if not marker.exists():
        with open(data / "captions.csv", newline="") as handle:
            captions = [row["caption"] for row in csv.DictReader(handle)]
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            models = pool.submit(_build_tiny_models, str(folder), captions).result()
        marker.write_text(json.dumps(models))
    models = json.loads(marker.read_text())
    return "tiny random-weight MarianMT built by the benchmark (no real models here)", {
        "models": models, "batch_size": 64, "max_new_tokens": 32}


def run_pipeline(config: Path, work: Path) -> tuple[CommandRun, dict]:
    run = filipbuild.run_build(config, work)
    stats = filipbuild.stage_stats(work / "out")
    stages = stats["stages"]
    return run, {"phases_seconds": filipbuild.phases(run), "phases_cpu_seconds": filipbuild.phase_cpu(run),
                 "cpu_by_process": run.cpu_by_name, "stats_json": stats, "rows_kept": stages["backtranslate"]["rows_out"]}


def run_loop(config: Path, work: Path) -> tuple[CommandRun, dict]:
    report = work / "loop.json"
    # One thread for torch's and onnxruntime's pools, as a Ray actor of num_cpus 1 gets.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = run_measured([sys.executable, LOOP, "--config", str(config), "--out", str(work / "loop-out"),
                        "--report", str(report)], work / "loop.log", env=env, keep=lambda line: False)
    if run.returncode != 0:
        raise RuntimeError(f"build_loop exited {run.returncode}:\n{(work / 'loop.log').read_text()[-3000:]}")
    result = json.loads(report.read_text())
    return run, {"stages": result["stages"], "rows_out": result["rows_out"],
                 "rows_kept": result["rows_out"]["backtranslate"]}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def stage_cpu(build_phases: list[dict], loop_stages: list[dict]) -> dict[str, dict]:
    """Per phase of the build that runs loop stages (one stage, or stages run together on the same
    actors, "a+b"), the median core-seconds of that phase and of the loop's same stages summed,
    and their ratio. The build's start-up phases (imports, input, Ray's start) and its tail have no
    loop stage: the loop's own imports are in its total only."""
    out = {}
    names = [name for name in build_phases[0] if set(name.split("+")) <= set(loop_stages[0])]
    for name in names:
        build = _median([phases.get(name, 0.0) for phases in build_phases])
        loop = _median([sum(stages[part]["cpu_seconds"] for part in name.split("+")) for stages in loop_stages])
        out[name] = {"build": build, "loop": loop, "ratio": round(build / loop, 2) if loop else None}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=webimages.DATA, help="folder with images/ and captions.csv")
    parser.add_argument("--urls", type=int, default=2000, help="URLs (the issue: 2,000)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs: build, loop, build, ...")
    parser.add_argument("--shard-size", type=int, default=500, help="rows per shard")
    parser.add_argument("--threads", type=int, default=64, help="download threads (per actor; the loop's pool)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photos' upscaled sizes")
    args = parser.parse_args(argv)
    models_note, translation = translation_models(args.data)
    photos = webimages.web_photos(args.data, args.seed)
    settings = {"shard_size": args.shard_size, "threads": args.threads, "timeout": args.timeout,
                "stages": list(DEFAULT_STAGES)}  # every stage, in the default order
    runs: dict[str, list[tuple[CommandRun, dict]]] = {"build": [], "loop": []}
    with webimages.served(photos) as base, tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        url_list = Path(tmp) / "urls.parquet"
        webimages.write_url_list(base, args.data, args.urls, url_list)
        for repeat in range(args.repeats):
            for name, runner in (("build", run_pipeline), ("loop", run_loop)):
                work = Path(tmp) / f"{name}-{repeat}"
                work.mkdir()
                sections = build_config(url_list, work / "out", settings)
                sections["backtranslation"] = {"enabled": True, **translation}
                config = filipbuild.write_config(work / "build.yaml", sections)
                run, outcome = runner(config, work)
                shutil.rmtree(work)
                runs[name].append((run, outcome))
                print(f"[{name}] repeat {repeat}: {outcome['rows_kept']} rows kept, {run.wall_seconds:.1f} s, "
                      f"{run.sampled_cpu_seconds:.1f} CPU s, load {run.load_start[0]}-{run.load_end[0]}",
                      file=sys.stderr)
    report: dict = {"bench": "build", "urls": args.urls, "repeats": args.repeats, "settings": settings,
                    "models": models_note, "web": webimages.photo_sizes(photos)}
    for name, results in runs.items():
        report[name] = {"wall_seconds": [round(r.wall_seconds, 2) for r, _ in results],
                        "cpu_seconds": [round(r.sampled_cpu_seconds, 2) for r, _ in results],
                        "rusage_cpu_seconds": [round(r.rusage_cpu_seconds, 2) for r, _ in results],
                        "peak_rss_mib": [round(r.peak_rss_bytes / 2**20, 1) for r, _ in results],
                        "load_start_end": [[r.load_start[0], r.load_end[0]] for r, _ in results],
                        "rows_kept": [o["rows_kept"] for _, o in results]}
        for key in results[0][1]:
            if key != "rows_kept":
                report[name][key] = [o[key] for _, o in results]
    walls = {name: [r.wall_seconds for r, _ in results] for name, results in runs.items()}
    cpus = {name: [r.sampled_cpu_seconds for r, _ in results] for name, results in runs.items()}
    report["cpu_ratio"] = round(_median(cpus["build"]) / _median(cpus["loop"]), 3)
    report["wall_ratio"] = round(_median(walls["build"]) / _median(walls["loop"]), 3)
    report["cpu_ratio_per_pair"] = [round(b / l, 3) for b, l in zip(cpus["build"], cpus["loop"])]
    report["wall_ratio_per_pair"] = [round(b / l, 3) for b, l in zip(walls["build"], walls["loop"])]
    report["stage_cpu_seconds"] = stage_cpu(report["build"]["phases_cpu_seconds"], report["loop"]["stages"])
    report["targets_met"] = {"cpu_ratio <= 1.2": report["cpu_ratio"] <= 1.2, "wall_ratio < 1": report["wall_ratio"] < 1}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
