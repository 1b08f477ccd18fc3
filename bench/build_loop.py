"""The single-process loop that `bench/build.py` measures against `filip build`: the same
per-image work on the same rows, as plainly as it can be written.

Reads the same build config (YAML) and, in one process: fetches every URL with a thread pool
through `filters/web/fetch.py` (the same guard and bounds) and encodes each body for training
(`filters/web/image_encode.py`) plus its sha256, as the download stage does; `inspect_image`
(decode, pHash) and the resolution and caption filters; the duplicate search
(`filters.dedup.find_duplicates` on sha256 and pHash); NudeNet (`UnsafeScorer`, a one-thread
onnxruntime session) on the rows still kept; back-translation (`BackTranslator`, torch on one
thread) of their captions; one WebDataset tar of the kept rows. Per stage it records wall and
CPU seconds (this process, every thread) into `--report` as JSON.

    .venv/bin/python bench/build_loop.py --config build.yaml --out loop-out --report loop.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import PipelineConfig, load_config


class StageClock:
    """Wall and CPU seconds per named stage, and the rows each stage kept."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    def run(self, name: str, function, *args):
        start, cpu = time.perf_counter(), time.process_time()
        result = function(*args)
        self.stages[name] = {"wall_seconds": round(time.perf_counter() - start, 2),
                             "cpu_seconds": round(time.process_time() - cpu, 2)}
        return result


def download(config: PipelineConfig, rows: list[dict]) -> list[dict]:
    """Each row with `image` (the stored bytes), sizes and sha256; failures are left out."""
    from filters.web.fetch import fetch_with_retries
    from filters.web.image_encode import ImageRefused, encode_for_training
    from pipeline.download import encode_settings, fetch_settings

    cfg = config.download
    fetching, encoding = fetch_settings(cfg), encode_settings(cfg)
    kept = []
    with ThreadPoolExecutor(cfg.thread_count) as pool:
        fetched = pool.map(lambda row: fetch_with_retries(row["url"], fetching, cfg.retries, cfg.max_retry_wait),
                           rows)
        for row, result in zip(rows, fetched):
            if result.body is None:
                continue
            try:
                encoded = encode_for_training(result.body, encoding)
            except ImageRefused:
                continue
            kept.append({**row, "image": encoded.data, "sha256": hashlib.sha256(result.body).hexdigest(),
                         "original_width": encoded.original_width, "original_height": encoded.original_height})
    return kept


def inspect(config: PipelineConfig, rows: list[dict]) -> list[dict]:
    from filters.caption import CaptionFilter
    from filters.image import ImageDecodeError, inspect_image
    from filters.resolution import ResolutionFilter

    resolution, caption = ResolutionFilter(config.inspect.resolution), CaptionFilter(config.inspect.caption)
    kept = []
    for row in rows:
        try:
            info = inspect_image(row["image"])
        except ImageDecodeError:
            continue
        if resolution.reason(row["original_width"], row["original_height"]) or caption.reason(row["caption"]):
            continue
        kept.append({**row, "phash": info.phash})
    return kept


def dedup(config: PipelineConfig, rows: list[dict]) -> list[dict]:
    from filters.dedup import find_duplicates

    if not rows:
        return rows
    keys = np.array([f"{i:09d}" for i in range(len(rows))])
    result = find_duplicates(keys, np.array([r["sha256"] for r in rows], dtype=object),
                             np.array([r["phash"] for r in rows], np.int64),
                             np.array([r["original_width"] * r["original_height"] for r in rows], np.int64),
                             config.dedup)
    return [row for row, reason in zip(rows, result.dup_reason) if reason is None]


def unsafe(config: PipelineConfig, rows: list[dict]) -> list[dict]:
    from filters.unsafe import UnsafeScorer

    scorer = UnsafeScorer(config.unsafe, threads=1)
    scorer.setup()
    scores = scorer.score_batch([row["image"] for row in rows]) if rows else []
    return [row for row, score in zip(rows, scores) if scorer.reason(float(score)) is None]


def backtranslate(config: PipelineConfig, rows: list[dict]) -> list[dict]:
    import torch

    from filters.backtranslation import BackTranslator

    torch.set_num_threads(1)
    translator = BackTranslator(config.backtranslation)
    translator.setup()
    size = config.backtranslation.batch_size
    for begin in range(0, len(rows), size):
        batch = rows[begin: begin + size]
        result = translator.translate([row["caption"] for row in batch])
        for row, de, ru in zip(batch, result.de, result.ru):
            row["caption_bt_de"], row["caption_bt_ru"] = de, ru
    return rows


def write_tar(rows: list[dict], path: Path) -> None:
    with tarfile.open(path, "w") as archive:
        for index, row in enumerate(rows):
            meta = {k: v for k, v in row.items() if k != "image"}
            for suffix, data in (("jpg", row["image"]), ("txt", row["caption"].encode()),
                                 ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{index:09d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the build's YAML config (run.input is read)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tar")
    parser.add_argument("--report", type=Path, required=True, help="JSON file for the per-stage times")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    clock = StageClock()
    table = pq.read_table(config.run.input, columns=[config.run.url_column, config.run.caption_column])
    rows = [{"url": u, "caption": c} for u, c in zip(table[config.run.url_column].to_pylist(),
                                                      table[config.run.caption_column].to_pylist())]
    counts = {"input": len(rows)}
    for name, step in (("download", download), ("inspect", inspect), ("dedup", dedup), ("unsafe", unsafe),
                       ("backtranslate", backtranslate)):
        rows = clock.run(name, step, config, rows)
        counts[name] = len(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    clock.run("shards", write_tar, rows, args.out / "00000.tar")
    args.report.write_text(json.dumps({"stages": clock.stages, "rows_out": counts}))


if __name__ == "__main__":
    main()
