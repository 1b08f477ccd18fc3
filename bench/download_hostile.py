"""One download worker against a page of hostile URLs: its peak memory and wall time.

The page mixes normal photos (the Flickr8k photos of ../shared/data) with the ways a web server can
hold or flood a crawler: slow drips (one byte every 0.25 s), 2 GB bodies with and without a
Content-Length, gzip bombs (200 MB of zeros in ~200 KB), pixel bombs (a PNG header declaring
20000 x 20000 pixels), redirect loops. The page is served by `pipeline.testweb` in a separate
process, so this process is the worker alone: `DownloadStage.run_shard` on one shard, the stage's
default settings (64 threads, 30 s deadline, 8 MiB body cap, 40 MP pixel cap) unless overridden.
Peak memory is this process's maximum resident set (getrusage), imports included.
Prints one JSON line (progress on stderr).

    .venv/bin/python bench/download_hostile.py --normal 256 --each 64
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import config_from_dict  # noqa: E402
from pipeline.download import DownloadStage, download_decisions  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from pipeline.testweb import png_declaring  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "flickr8k-1k"


def _serve(folder: str, queue) -> None:
    from pipeline.testweb import serve_web

    with serve_web(folder, slow_seconds=60) as base:
        queue.put(base)
        time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with images/")
    parser.add_argument("--normal", type=int, default=256, help="normal photos in the page")
    parser.add_argument("--each", type=int, default=64, help="URLs of each hostile kind")
    parser.add_argument("--threads", type=int, default=None, help="download threads (default: the stage's)")
    parser.add_argument("--deadline", type=float, default=None, help="download.deadline (default: the stage's)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        web = Path(tmp) / "web"
        web.mkdir()
        photos = sorted((args.data / "images").iterdir())[: args.normal]
        for photo in photos:
            shutil.copy(photo, web / photo.name)
        (web / "bomb.png").write_bytes(png_declaring(20000, 20000))
        queue = multiprocessing.get_context("spawn").Queue()
        server = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(web), queue), daemon=True)
        server.start()
        base = queue.get(timeout=60)
        try:
            hostile = {"drip": "/drip/1000000", "stream_2gb": "/stream/2000", "declared_2gb": "/declared/2000",
                       "gzip_bomb": "/gzipbomb/200", "pixel_bomb": "/img/bomb.png", "loop": "/loop/1"}
            rows = [(f"{base}/img/{p.name}", "normal") for p in photos]
            for kind, route in hostile.items():
                rows += [(f"{base}{route}?n={i}", kind) for i in range(args.each)]
            random.Random(0).shuffle(rows)
            out = Path(tmp) / "out"
            download = {"allow_networks": ["127.0.0.1/32"]}
            if args.threads:
                download["thread_count"] = args.threads
            if args.deadline:
                download["deadline"] = args.deadline
            config = config_from_dict({"run": {"input": "unused", "output": str(out)}, "download": download})
            storage = Storage(str(out))
            storage.write_parquet("input/00000.parquet", pa.table({
                "row_id": list(range(len(rows))), "url": [u for u, _ in rows], "caption": [k for _, k in rows]}))
            stage = DownloadStage(str(out), config.download, shard_size=len(rows))
            print(f"{len(rows)} URLs, {config.download.thread_count} threads", file=sys.stderr)
            start = time.perf_counter()
            stage.run_shard("00000")
            wall = time.perf_counter() - start
            table = download_decisions(storage.read_parquet("download/00000.parquet"))
        finally:
            server.terminate()
    outcomes: dict[str, Counter] = {}
    for kind, reason in zip(table["caption"].to_pylist(), table["drop_reason"].to_pylist()):
        outcomes.setdefault(kind, Counter())[reason or "ok"] += 1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "bench": "download_hostile", "urls": len(rows), "normal": len(photos),
        "normal_ok": outcomes.get("normal", Counter())["ok"],
        "outcomes": {kind: dict(counts) for kind, counts in sorted(outcomes.items())},
        "wall_seconds": round(wall, 2), "peak_rss_mib": round(peak_mib, 1),
        "threads": config.download.thread_count, "deadline": config.download.deadline,
        "max_body_bytes": config.download.max_body_bytes, "max_pixels": config.download.max_pixels,
        "under_1_5_gib": peak_mib < 1536}))


if __name__ == "__main__":
    main()
