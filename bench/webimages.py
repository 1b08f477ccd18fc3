"""A loopback web of web-size photos for the whole-command benchmarks, served from its own process.

The 1,000 Flickr8k photos (../shared/data/flickr8k-1k, 80-500 px) are upscaled so that the longer
side is 640-1,280 px (seeded) and re-encoded as JPEG: web-size images, ~70-200 KB, that every
downloader must decode and resize to 256 px. They are made once per seed and cached in the temp
folder. `pipeline.testweb.serve_web` serves them on 127.0.0.1 in a separate process, so that the
server's CPU is in neither measured command's process tree. The URL list repeats the photos
(`/img/NAME?v=N`; the server ignores the query): URL i is photo i mod 1,000, with the photo's
(i div 1,000) mod 5-th caption.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "flickr8k-1k"
SIDES = (640, 1280)  # the longer side of a web photo, drawn uniformly
QUALITY = 90


def web_photos(data: Path = DATA, seed: int = 0) -> Path:
    """The folder of upscaled photos for `seed` (made on the first call, then reused)."""
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.gettempdir()) / f"filip-bench-web-{seed}-{SIDES[0]}-{SIDES[1]}-q{QUALITY}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    sources = sorted((data / "images").glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no *.jpg under {data / 'images'}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for source in sources:
        with Image.open(source) as photo:
            photo = photo.convert("RGB")
            scale = int(rng.integers(SIDES[0], SIDES[1] + 1)) / max(photo.size)
            size = (round(photo.width * scale), round(photo.height * scale))
            buffer = io.BytesIO()
            photo.resize(size, Image.LANCZOS).save(buffer, "JPEG", quality=QUALITY)
        (folder / source.name).write_bytes(buffer.getvalue())
    marker.write_text(str(len(sources)))
    return folder


def photo_sizes(folder: Path) -> dict[str, float]:
    """Percentiles (5, 50, 95) of the served photos' body sizes in KB, and their longer sides."""
    import numpy as np
    from PIL import Image

    paths = sorted(folder.glob("*.jpg"))
    sizes = np.array([path.stat().st_size for path in paths]) / 1000
    sides = []
    for path in paths:
        with Image.open(path) as photo:  # reads the header only
            sides.append(max(photo.size))
    return {"photos": len(paths), "kb_p5_p50_p95": np.percentile(sizes, [5, 50, 95]).round(1).tolist(),
            "longer_side_min_max": [min(sides), max(sides)]}


def write_url_list(base: str, data: Path, n_urls: int, path: Path) -> None:
    """Parquet `url`, `caption`: `n_urls` distinct URLs over the photos (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions: dict[str, list[str]] = {}
    with open(data / "captions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            captions.setdefault(row["image"], []).append(row["caption"])
    images = sorted(captions)
    rows = [(images[i % len(images)], i // len(images)) for i in range(n_urls)]
    urls = [f"{base}/img/{image}?v={i}" for i, (image, _) in enumerate(rows)]
    texts = [captions[image][turn % len(captions[image])] for image, turn in rows]
    pq.write_table(pa.table({"url": urls, "caption": texts}), path)


def _serve(folder: str, queue) -> None:
    from pipeline.testweb import serve_web

    with serve_web(folder) as base:
        queue.put(base)
        while True:  # until the parent terminates this process
            time.sleep(60)


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 from a child process; yields the base URL."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    server = context.Process(target=_serve, args=(str(folder), queue), daemon=True)
    server.start()
    try:
        yield queue.get(timeout=120)
    finally:
        server.terminate()
        server.join(timeout=10)
