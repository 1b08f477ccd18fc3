"""Images per core-second of the unsafe stage on Ray against a single-process loop, same images.

(a) the pipeline: `UnsafeStage` run by `pipeline.ray_adapter.run_stage` over download shards of real
Flickr8k photos (a tar per shard as img2dataset writes it, plus the previous stage's parquet);
each actor reports its own CPU time (getrusage, all threads) from the start of setup() to
teardown(), i.e. model load, tar reads, decode, inference and parquet writes, and its whole
process CPU (Ray worker start and imports included) as an extra column.
(b) the loop: the same tars read, `UnsafeScorer` with a one-thread onnxruntime session, CPU time
from before setup() to the last score. The two runs' scores must agree (max_abs_score_difference).

`--web` re-encodes each photo with its longer side 640-1,280 px (JPEG q90), as web images are
before download resizing, so that the reduced-scale JPEG decode has work to do. Prints one JSON line.

    .venv/bin/python bench/unsafe_throughput.py --limit 320 --shard-size 80
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.stage import Resources
from pipeline.stages.unsafe import UnsafeStage
from pipeline.storage import Storage

FLICKR_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k" / "images"
INPUT_STAGE = "dedup"  # the stage before unsafe in a build


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


class MeasuredUnsafeStage(UnsafeStage):
    """The real stage, plus a CPU-time record per actor written to `bench/<pid>.json` at teardown."""

    def setup(self) -> None:
        self._cpu_at_setup = _cpu_seconds()
        super().setup()

    def teardown(self) -> None:
        import os

        super().teardown()
        self.storage.write_json(f"bench/{os.getpid()}.json", {
            "work_cpu_seconds": _cpu_seconds() - self._cpu_at_setup, "process_cpu_seconds": _cpu_seconds()})


def _bodies(images: Path, limit: int, web: bool) -> list[bytes]:
    from PIL import Image

    paths = sorted(images.glob("*.jpg"))[:limit]
    if not paths:
        raise SystemExit(f"no *.jpg under {images}")
    if not web:
        return [path.read_bytes() for path in paths]
    rng = np.random.default_rng(0)
    bodies = []
    for path in paths:
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
            scale = int(rng.integers(640, 1281)) / max(photo.size)
            buffer = io.BytesIO()
            photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS).save(
                buffer, "JPEG", quality=90)
            bodies.append(buffer.getvalue())
    return bodies


def write_shards(storage: Storage, bodies: list[bytes], shard_size: int) -> list[str]:
    """download/<shard>.tar (key.jpg members) and <INPUT_STAGE>/<shard>.parquet, all rows kept."""
    storage.makedirs("download")
    shards = []
    for number, begin in enumerate(range(0, len(bodies), shard_size)):
        shard = f"{number:05d}"
        keys = [f"{shard}{index:04d}" for index in range(len(bodies[begin: begin + shard_size]))]
        with tarfile.open(storage.path(f"download/{shard}.tar"), "w") as archive:
            for key, body in zip(keys, bodies[begin: begin + shard_size]):
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(body)
                archive.addfile(info, io.BytesIO(body))
        storage.write_parquet(f"{INPUT_STAGE}/{shard}.parquet", pa.table({
            "key": keys, "caption": ["a photo"] * len(keys), "drop_reason": pa.nulls(len(keys), pa.string()),
            "drop_kind": pa.nulls(len(keys), pa.string())}))
        shards.append(shard)
    return shards


def run_pipeline(storage: Storage, shards: list[str], resources: Resources) -> tuple[dict, np.ndarray]:
    from filters.unsafe import UnsafeFilterConfig
    from pipeline.ray_adapter import init_ray, run_stage

    init_ray()
    stage = MeasuredUnsafeStage(storage.url, INPUT_STAGE, UnsafeFilterConfig(), resources)
    start, driver_cpu = time.perf_counter(), time.process_time()
    stats = run_stage(stage, shards, progress=lambda message: None)
    wall, driver_cpu = time.perf_counter() - start, time.process_time() - driver_cpu
    actors = [json.loads(path.read_text()) for path in sorted(Path(storage.path("bench")).glob("*.json"))]
    scores = np.concatenate([storage.read_parquet(f"unsafe/{shard}.parquet")["unsafe_score"].to_numpy()
                             for shard in shards])
    work = sum(actor["work_cpu_seconds"] for actor in actors)
    return {"actors": len(actors), "rows": sum(item.rows_in for item in stats), "wall_seconds": round(wall, 2),
            "cpu_seconds": round(work, 2), "images_per_core_second": round(len(scores) / work, 1),
            "actor_process_cpu_seconds": round(sum(a["process_cpu_seconds"] for a in actors), 2),
            "driver_cpu_seconds": round(driver_cpu, 2)}, scores


def run_loop(storage: Storage, shards: list[str]) -> tuple[dict, np.ndarray]:
    from filters.unsafe import UnsafeScorer
    from pipeline.records import read_tar_images

    start, cpu = time.perf_counter(), time.process_time()
    scorer = UnsafeScorer(threads=1)
    scorer.setup()
    scores = np.concatenate([scorer.score_batch([body for body, _, _ in read_tar_images(storage, shard).values()])
                             for shard in shards])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "images_per_core_second": round(len(scores) / cpu, 1), "providers": scorer.providers}, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=FLICKR_IMAGES)
    parser.add_argument("--limit", type=int, default=320)
    parser.add_argument("--shard-size", type=int, default=80)
    parser.add_argument("--web", action="store_true", help="re-encode at 640-1,280 px (web-size JPEGs)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="unsafe.resources.num_cpus per actor")
    args = parser.parse_args(argv)
    bodies = _bodies(args.images, args.limit, args.web)
    with tempfile.TemporaryDirectory(prefix="unsafe-bench-") as folder:
        storage = Storage(folder)
        shards = write_shards(storage, bodies, args.shard_size)
        # The loop first: the pipeline then runs in a warm page cache too, and Ray's start is its own.
        loop, loop_scores = run_loop(storage, shards)
        pipeline, pipeline_scores = run_pipeline(storage, shards, Resources(num_cpus=args.num_cpus))
    report = {"bench": "unsafe_throughput", "images": len(bodies), "shards": len(shards), "web_size": args.web,
              "num_cpus_per_actor": args.num_cpus, "pipeline": pipeline, "loop": loop,
              "pipeline_over_loop_per_core": round(pipeline["images_per_core_second"]
                                                   / loop["images_per_core_second"], 3),
              "max_abs_score_difference": float(np.abs(pipeline_scores - loop_scores).max()),
              "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
