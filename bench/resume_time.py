"""Time from a loader resume to its first batch, early and late in a resampled stream.

    python bench/resume_time.py --positions 10 2000 20000 --out resume.json

Writes small synthetic shards (64x64 JPEGs, a caption, a JSON with back-translations), runs one
uninterrupted loader (one process, no workers) through the largest position and keeps the resume
state of each position's batch, then resumes from each state `--repeats` times and times building
the dataset and drawing its first batch. The old loader's way, re-reading every raw sample up to
the position through webdataset before the first batch, is timed beside it (`--no-old` skips it).
Prints one JSON line: per position the best and all times, new and old.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_shards(folder: Path, shards: int, per_shard: int, side: int) -> list[str]:
    from PIL import Image

    rng = random.Random(0)
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:05d}"
                colour = tuple(rng.randrange(256) for _ in range(3))
                buffer = io.BytesIO()
                Image.new("RGB", (side, side), colour).rotate(rng.randrange(360)).save(buffer, "JPEG")
                caption = f"a photo of thing {rng.randrange(1000)} in colour {colour[0]}"
                meta = {"key": key, "caption": caption, "caption_bt_de": caption + " de",
                        "caption_bt_ru": None, "caption_bt_ru_reason": "degenerate"}
                for name, payload in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption.encode()),
                                      (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def make_dataset(shards: list[str], tokenizer: Any, args: argparse.Namespace, resume: dict | None = None) -> Any:
    from filip.data import ShardDataset, train_transform

    return ShardDataset(shards, tokenizer, args.batch, train_transform(args.image_size), seed=0,
                        resampled=True, shuffle_buffer=args.shuffle_buffer, resume=resume)


def old_resume(shards: list[str], tokenizer: Any, args: argparse.Namespace, position: int) -> None:
    """The loader before this change: read (not decode) every raw sample up to `position`, then a batch."""
    import torch
    import webdataset as wds
    from PIL import Image

    from filip.data import _mix, pick_caption, train_transform

    transform = train_transform(args.image_size)
    shard_rng = random.Random(_mix(0, 0, 0, 1))

    def urls() -> Any:
        while True:
            yield {"url": shard_rng.choice(shards)}

    rng, buffer, images, captions = random.Random(_mix(0, 0, 0, 0, 3)), [], [], []
    skipped = 0
    for sample in wds.tarfile_to_samples()(urls()):
        if len(buffer) < args.shuffle_buffer:
            buffer.append(sample)
            continue
        slot = rng.randrange(len(buffer))
        buffer[slot], sample = sample, buffer[slot]
        if skipped < position:
            skipped += 1
            continue
        seed = _mix(0, 0, 0, 0, skipped + len(images))
        captions.append(pick_caption(sample, random.Random(seed)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            images.append(transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
        if len(images) == args.batch:
            _ = torch.stack(images), tokenizer(captions)
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[10, 2000, 20000],
                        help="samples consumed before the resume (rounded up to whole batches)")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-old", action="store_true", help="skip timing the old way")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import torch

    from filip.tokenizer import FilipTokenizer, train_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="resume-bench-") as tmp:
        folder = Path(tmp)
        shards = write_shards(folder, args.shards, args.per_shard, side=64)
        captions = [f"a photo of thing {i} in colour {i % 256}" for i in range(2000)]
        tokenizer = FilipTokenizer.load(train_tokenizer(captions, folder / "tokenizer.model", 300))
        batches = {-(-p // args.batch): p for p in args.positions}  # batch count -> asked position
        states: dict[int, dict] = {}
        for count, batch in enumerate(make_dataset(shards, tokenizer, args), start=1):
            if count in batches:
                states[batch["position"]] = batch["resume_state"]
            if count >= max(batches):
                break
        results = []
        for position, state in sorted(states.items()):
            new = []
            for _ in range(args.repeats):
                tick = time.perf_counter()
                next(iter(make_dataset(shards, tokenizer, args, resume={0: state})))
                new.append(round(time.perf_counter() - tick, 4))
            row: dict[str, Any] = {"position": position, "new_s": min(new), "new_all_s": new,
                                   "state_json_bytes": len(json.dumps(state))}
            if not args.no_old:
                tick = time.perf_counter()
                old_resume(shards, tokenizer, args, position)
                row["old_s"] = round(time.perf_counter() - tick, 4)
            results.append(row)
    report = {"bench": "resume_time", "batch": args.batch, "shuffle_buffer": args.shuffle_buffer,
              "shards": args.shards, "per_shard": args.per_shard, "resampled": True, "results": results,
              "late_over_early_new": round(results[-1]["new_s"] / results[0]["new_s"], 2),
              "wall_s": round(time.perf_counter() - start, 2)}
    line = json.dumps(report)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
