"""Word-patch localisation: FILIP against the CLIP loss, tiny models trained the same way on scenes.

Generated scenes (coloured shapes at known places, captions naming them) are written as WebDataset
shards with their own tokenizer; `filip.trainer` trains the tiny model on them twice, once per loss,
with the same seed, data order and steps. Both are then scored on held-out two-object scenes:
localisation (share of colour/shape tokens whose best patch lies inside the named object), the share
that picked the other object, chance, and caption retrieval among the held-out scenes (so a low
localisation cannot hide a model that learned nothing). Prints a Markdown table and one JSON line.

    .venv/bin/python bench/align_localisation.py --steps 300 --seeds 0 1
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

from filip.scenes import Scene, evaluate_localisation, generate_scenes


def write_scene_shards(out_dir: Path, scenes: list[Scene], shard_size: int, vocab_size: int) -> Path:
    """Scenes in the pipeline's final-shard layout (jpg, txt, json) plus a tokenizer beside them."""
    from filip.tokenizer import DEFAULT_NAME, train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    for shard_id, start in enumerate(range(0, len(scenes), shard_size)):
        with tarfile.open(out_dir / f"{shard_id:05d}.tar", "w") as tar:
            for index, scene in enumerate(scenes[start:start + shard_size]):
                key = f"{shard_id:05d}{index:04d}"
                buffer = io.BytesIO()
                # High quality: JPEG artefacts would blur the colours the captions name.
                scene.image.save(buffer, format="JPEG", quality=95)
                meta = {"key": key, "caption": scene.caption}
                for suffix, payload in (("jpg", buffer.getvalue()), ("txt", scene.caption.encode()),
                                        ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    train_tokenizer([s.caption for s in scenes], out_dir / DEFAULT_NAME, vocab_size)
    return out_dir


def train_tiny(shards_dir: Path, out_dir: Path, loss: str, steps: int, batch_size: int,
               seed: int) -> Path:
    """Trains the tiny preset with `filip.trainer`; returns the final checkpoint."""
    from filip.checkpoint import latest_checkpoint
    from filip.config import config_from_dict
    from filip.trainer import train

    cfg = config_from_dict({
        "model": {"preset": "tiny"},
        # No AutoAugment: its colour operations would contradict the colour words of the captions.
        "data": {"shards": str(shards_dir), "batch_size": batch_size, "num_workers": 0,
                 "shuffle_buffer": 500, "crop_scale_min": 0.9, "auto_augment": False},
        "loss": {"kind": loss, "gather_dtype": "float32"},
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 20},
        "run": {"output_dir": str(out_dir), "max_steps": steps, "log_every": 50,
                "checkpoint_every": steps, "keep_checkpoints": 1, "progress_bar": False, "seed": seed},
    }, "<align_localisation>")
    train(cfg)
    path = latest_checkpoint(out_dir)
    if path is None:
        raise RuntimeError(f"training wrote no checkpoint to {out_dir}")
    return path


def scene_retrieval_r1(bundle: Any, scenes: list[Scene]) -> float:
    """Image-to-caption R@1 (percent) among the held-out scenes, with the checkpoint's own scoring."""
    import torch

    from filip.features import extract_image_features, extract_text_features, score_matrices
    from filip.metrics import positives_from_groups, recall_at_k

    images = extract_image_features(bundle.model, [bundle.image_transform(s.image) for s in scenes])
    texts = extract_text_features(bundle.model, bundle.tokenizer, [s.caption for s in scenes])
    i2t, _ = score_matrices(images, texts, bundle.loss_kind)
    # Scenes with the same objects are all positives: positions and word order are not in the task.
    kinds = [tuple(sorted((o.colour, o.shape) for o in s.objects)) for s in scenes]
    index = {kind: i for i, kind in enumerate(dict.fromkeys(kinds))}
    groups = torch.tensor([index[kind] for kind in kinds])
    return recall_at_k(i2t, positives_from_groups(groups, groups), (1,))[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--eval-scenes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/align_localisation"))
    args = parser.parse_args(argv)

    from filip.checkpoint import load_for_inference

    # Training scenes have 1 to 3 objects; held-out ones exactly 2, from a different seed.
    shards = write_scene_shards(args.out / "shards", generate_scenes(args.train_scenes, seed=100,
                                                                    min_objects=1, max_objects=3),
                                shard_size=500, vocab_size=100)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for loss in ("filip", "clip"):
            started = time.perf_counter()
            checkpoint = train_tiny(shards, args.out / f"{loss}-seed{seed}", loss, args.steps,
                                    args.batch_size, seed)
            train_s = time.perf_counter() - started
            bundle = load_for_inference(checkpoint)
            result = evaluate_localisation(bundle, args.eval_scenes, seed=200)
            held_out = generate_scenes(args.eval_scenes, seed=200, min_objects=2, max_objects=2)
            result["scene_i2t_r1"] = scene_retrieval_r1(bundle, held_out)
            rows.append({"loss": loss, "seed": seed, "steps": args.steps, "train_s": round(train_s, 1),
                         **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| loss | seed | steps | localisation | other object | chance | scene I→T R@1 | train s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['loss']} | {r['seed']} | {r['steps']} | {r['localisation']:.1f} | "
              f"{r['other_object']:.1f} | {r['chance']:.1f} | {r['scene_i2t_r1']:.1f} | {r['train_s']} |")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
