"""FILIP against the CLIP loss on `base`: brief training on Flickr8k photos, zero-shot and retrieval.

Two steps, so that the GPU machine (which cannot see ../shared) gets everything it needs in one
folder of the repository:

    .venv/bin/python bench/eval_base_flickr.py prepare --data out/gpu      # here, on the CPU
    python bench/eval_base_flickr.py run --data out/gpu --out $OUT         # on the GPU

`prepare` writes shards of the first 800 Flickr8k images (sorted by name), a tokenizer trained on
their captions, the other 200 images with their captions as a held-out retrieval set, and a copy of
the CIFAR-10 images for zero-shot. `run` trains both losses with the same seed, data and steps, then
evaluates each; results are written after every model, so a cut-off run still returns what it has.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shutil
import tarfile
import time
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_IMAGES = 800


def prepare(data: Path, flickr: Path, cifar: Path, max_side: int, shard_size: int) -> None:
    """Training shards, tokenizer, held-out retrieval set and zero-shot images under `data`."""
    from PIL import Image

    from filip.tokenizer import DEFAULT_NAME, train_tokenizer

    captions: dict[str, list[str]] = defaultdict(list)
    with (flickr / "captions.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            captions[row["image"]].append(row["caption"].strip())
    names = sorted(captions)
    train, held_out = names[:TRAIN_IMAGES], names[TRAIN_IMAGES:]
    shards = data / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for shard_id, start in enumerate(range(0, len(train), shard_size)):
        with tarfile.open(shards / f"{shard_id:05d}.tar", "w") as tar:
            for index, name in enumerate(train[start:start + shard_size]):
                key = f"{shard_id:05d}{index:04d}"
                image = Image.open(flickr / "images" / name).convert("RGB")
                image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                caps = captions[name]
                # The loader draws one of txt and the two back-translation fields per sample: two
                # more human captions stand in for them, so three of the five captions are seen.
                meta = {"key": key, "caption": caps[0], "caption_bt_de": caps[1], "caption_bt_ru": caps[2]}
                for suffix, payload in (("jpg", buffer.getvalue()), ("txt", caps[0].encode()),
                                        ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    train_tokenizer([c for name in train for c in captions[name]], shards / DEFAULT_NAME, 8000)
    images = data / "heldout" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with (data / "heldout" / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for name in held_out:
            image = Image.open(flickr / "images" / name).convert("RGB")
            image.thumbnail((max_side, max_side))
            image.save(images / name, quality=90)
            writer.writerows([name, c] for c in captions[name])
    shutil.copytree(cifar, data / "cifar10", dirs_exist_ok=True)


def run(data: Path, out: Path, preset: str, steps: int, batch_size: int, workers: int) -> None:
    """Trains FILIP then CLIP and evaluates each on zero-shot CIFAR-10 and held-out retrieval."""
    import torch

    from filip.checkpoint import latest_checkpoint, load_for_inference
    from filip.config import config_from_dict
    from filip.evaluate import format_markdown
    from filip.retrieval import evaluate_retrieval
    from filip.trainer import train
    from filip.zeroshot import evaluate_zeroshot

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    tables: list[str] = []
    summary: dict[str, dict] = {}
    for loss in ("filip", "clip"):
        started = time.perf_counter()
        run_dir = out / f"{preset}-{loss}"
        train(config_from_dict({
            "model": {"preset": preset},
            # Resampled shards: no epoch restarts on a data set this small.
            "data": {"shards": str(data / "shards"), "batch_size": batch_size, "num_workers": workers,
                     "resampled": True, "shuffle_buffer": 400, "crop_scale_min": 0.5,
                     "auto_augment": False},
            "loss": {"kind": loss},
            "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.1, "warmup_steps": steps // 10},
            "run": {"output_dir": str(run_dir), "max_steps": steps, "log_every": 25,
                    "checkpoint_every": steps, "keep_checkpoints": 1, "progress_bar": False, "seed": 0},
        }, "<eval_base_flickr>"))
        train_s = time.perf_counter() - started
        bundle = load_for_inference(latest_checkpoint(run_dir), device=device)
        results = {"checkpoint": f"{preset}-{loss} ({steps} steps)", "loss_kind": loss, "seed": 0,
                   "train_s": round(train_s, 1),
                   "zeroshot": {"cifar10-test-1k": evaluate_zeroshot(bundle, data / "cifar10", device=device,
                                                                     batch_size=256)},
                   "retrieval": {"flickr8k held-out 200": evaluate_retrieval(
                       bundle, data / "heldout" / "captions.csv", device=device, batch_size=256)}}
        results["seconds"] = round(time.perf_counter() - started, 1)
        summary[loss] = results
        tables.append(format_markdown(results, label=f"{preset} {loss}"))
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "results.md").write_text("\n".join(tables))
        # Checkpoints are large and not needed back here.
        for path in run_dir.glob("*.pt"):
            path.unlink()
        print(tables[-1], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--data", type=Path, default=Path("out/gpu"))
    prep.add_argument("--flickr", type=Path, default=SHARED / "flickr8k-1k")
    prep.add_argument("--cifar", type=Path, default=SHARED / "cifar10-test-1k")
    prep.add_argument("--max-side", type=int, default=256)
    prep.add_argument("--shard-size", type=int, default=50)
    go = sub.add_parser("run")
    go.add_argument("--data", type=Path, default=Path("out/gpu"))
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--preset", default="base")
    go.add_argument("--steps", type=int, default=300)
    go.add_argument("--batch-size", type=int, default=128)
    go.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "prepare":
        prepare(args.data, args.flickr, args.cifar, args.max_side, args.shard_size)
    else:
        run(args.data, args.out, args.preset, args.steps, args.batch_size, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
