"""Fixtures for the FILIP tests: WebDataset shards built from flickr8k-1k and trained tiny checkpoints.

`build_flickr_shards` and `tiny_checkpoint` are meant for other test modules (the evaluator's) too.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

# Same default as tests/conftest.py (not imported: conftest modules are not importable by name).
FLICKR_DIR = Path(os.environ.get("FILIP_SHARED_DATA",
                                 Path(__file__).resolve().parents[2].parent / "shared" / "data")
                  ) / "flickr8k-1k"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # byte-identical shards from run to run
    tar.addfile(info, io.BytesIO(payload))


def build_flickr_shards(out_dir: str | Path, n_images: int, shard_size: int, *,
                        back_translations: bool = False, max_side: int | None = 160,
                        vocab_size: int = 1000, flickr_dir: Path = FLICKR_DIR) -> list[str]:
    """Write the pipeline's final-shard layout from flickr8k-1k and return the .tar paths.

    Each sample is `{key}.jpg`, `{key}.txt` (the image's first caption) and `{key}.json`
    (metadata with all five captions under "captions"; with `back_translations`, captions 2 and 3
    stand in for `caption_bt_de` / `caption_bt_ru`). Images are shrunk to `max_side` (as the
    pipeline's resize would) so CPU tests decode fast. A SentencePiece tokenizer trained on all
    captions is written beside the shards as `tokenizer.model`.
    """
    from PIL import Image

    from filip.tokenizer import DEFAULT_NAME, train_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions: dict[str, list[str]] = defaultdict(list)
    with open(flickr_dir / "captions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            captions[row["image"]].append(row["caption"].strip())
    names = sorted(captions)[:n_images]
    if len(names) < n_images:
        raise ValueError(f"only {len(names)} images in {flickr_dir}")
    paths: list[str] = []
    for shard_id, start in enumerate(range(0, n_images, shard_size)):
        path = out_dir / f"{shard_id:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, name in enumerate(names[start:start + shard_size]):
                key = f"{shard_id:05d}{index:04d}"
                image = Image.open(flickr_dir / "images" / name).convert("RGB")
                if max_side is not None:
                    image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                caps = captions[name]
                meta: dict[str, Any] = {"key": key, "url": f"file://{name}", "caption": caps[0],
                                        "captions": caps, "width": image.width,
                                        "height": image.height}
                if back_translations and len(caps) >= 3:
                    meta["caption_bt_de"], meta["caption_bt_ru"] = caps[1], caps[2]
                _add_member(tar, f"{key}.jpg", buffer.getvalue())
                _add_member(tar, f"{key}.txt", caps[0].encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(str(path))
    all_captions = [c for name in names for c in captions[name]]
    train_tokenizer(all_captions, out_dir / DEFAULT_NAME, vocab_size)
    return paths


def tiny_train_config(shards_dir: Path, output_dir: Path, *, loss: str = "filip", max_steps: int = 100,
                      batch_size: int = 32, num_workers: int = 0) -> dict[str, Any]:
    """A config dict for the tiny model that learns visibly within 100 CPU steps."""
    return {
        "model": {"preset": "tiny"},
        "data": {"shards": str(shards_dir), "batch_size": batch_size, "num_workers": num_workers,
                 "shuffle_buffer": 200, "crop_scale_min": 0.8, "auto_augment": False},
        # No token selection: the tiny model's 16 patches learn too slowly when 4 are kept.
        "loss": {"kind": loss, "gather_dtype": "float32", "token_keep_ratio": 1.0},
        "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.05, "warmup_steps": 10},
        "run": {"output_dir": str(output_dir), "max_steps": max_steps, "log_every": 10,
                "checkpoint_every": 50, "keep_checkpoints": 5, "progress_bar": False, "seed": 0,
                "cpu_threads": 1},
    }


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_config_writer() -> Any:
    """`(shards_dir, output_dir, path, **kwargs) -> path` writing a tiny train config YAML."""
    def write(shards_dir: Path, output_dir: Path, path: Path, **kwargs: Any) -> Path:
        return write_config(tiny_train_config(shards_dir, output_dir, **kwargs), path)
    return write


@pytest.fixture(scope="session")
def flickr_shard_builder(flickr_dir: Path) -> Any:
    """`build_flickr_shards` itself, for tests that want their own shard layout."""
    def build(out_dir: str | Path, n_images: int, shard_size: int, **kwargs: Any) -> list[str]:
        return build_flickr_shards(out_dir, n_images, shard_size, flickr_dir=flickr_dir, **kwargs)
    return build


@pytest.fixture(scope="session")
def flickr_shards(tmp_path_factory: pytest.TempPathFactory, flickr_dir: Path) -> list[str]:
    """400 flickr images in 4 shards of 100, with stand-in back-translations and a tokenizer."""
    return build_flickr_shards(tmp_path_factory.mktemp("flickr_shards"), 400, 100,
                               back_translations=True, flickr_dir=flickr_dir)


@pytest.fixture(scope="session")
def tiny_training_run(tmp_path_factory: pytest.TempPathFactory, flickr_shards: list[str]) -> Path:
    """Output folder of one uninterrupted 100-step FILIP run of the tiny model (metrics, checkpoints)."""
    from filip.trainer import main

    out = tmp_path_factory.mktemp("tiny_run")
    config = write_config(tiny_train_config(Path(flickr_shards[0]).parent, out / "run"), out / "train.yaml")
    assert main([str(config)]) == 0
    return out / "run"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_training_run: Path) -> Path:
    """A trained tiny FILIP checkpoint (load it with filip.checkpoint.load_for_inference)."""
    from filip.checkpoint import latest_checkpoint

    path = latest_checkpoint(tiny_training_run)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory, flickr_shards: list[str]) -> Path:
    """A tiny checkpoint trained briefly (30 steps) with the CLIP loss."""
    from filip.checkpoint import latest_checkpoint
    from filip.trainer import main

    out = tmp_path_factory.mktemp("tiny_clip_run")
    cfg = tiny_train_config(Path(flickr_shards[0]).parent, out / "run", loss="clip", max_steps=30)
    assert main([str(write_config(cfg, out / "train.yaml"))]) == 0
    path = latest_checkpoint(out / "run")
    assert path is not None
    return path
