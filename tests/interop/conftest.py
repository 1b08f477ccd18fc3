"""The corpus the interop tests read: one small real build (every stage, back-translation with
tiny MarianMT models) of Flickr photos served on 127.0.0.1, made once per session."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.pipeline.conftest import MIN_SIDE, make_config

N_IMAGES = 12
SAMPLES_PER_SHARD = 4


def _kept_photos(flickr_dir: Path, count: int) -> list[tuple[str, str]]:
    """The first `count` photos that the inspect stage keeps, with their first caption."""
    chosen: dict[str, str] = {}
    with (flickr_dir / "captions.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["image"] in chosen:
                continue
            with Image.open(flickr_dir / "images" / row["image"]) as image:
                width, height = image.size
            if min(width, height) >= MIN_SIDE and max(width, height) <= 3 * min(width, height):
                chosen[row["image"]] = row["caption"]
            if len(chosen) == count:
                return list(chosen.items())
    raise ValueError(f"fewer than {count} usable photos in {flickr_dir}")


@pytest.fixture(scope="session")
def interop_corpus(tmp_path_factory: pytest.TempPathFactory, flickr_dir: Path, ray_session) -> Path:
    """The output folder of `filip build` on N_IMAGES photos, SAMPLES_PER_SHARD per final shard."""
    from filters.backtranslation.tiny_models import build_tiny_marian_models
    from pipeline.build import build
    from pipeline.testweb import serve_web

    root = tmp_path_factory.mktemp("interop")
    (root / "web" / "images").mkdir(parents=True)
    photos = _kept_photos(flickr_dir, N_IMAGES)
    for name, _ in photos:
        shutil.copy(flickr_dir / "images" / name, root / "web" / "images" / name)
    with (flickr_dir / "captions.csv").open(newline="") as handle:
        corpus = [row["caption"] for row, _ in zip(csv.DictReader(handle), range(300))]
    models = build_tiny_marian_models(root / "models", corpus)
    with serve_web(root / "web") as base_url:
        with (root / "urls.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "caption"])
            writer.writerows((f"{base_url}/img/images/{name}", caption) for name, caption in photos)
        config = make_config(root / "urls.csv", root / "out", models,
                             dedup={"single_machine_max_rows": 10_000},
                             shards={"samples_per_shard": SAMPLES_PER_SHARD})
        build(config, progress=lambda message: None)
    return root / "out"
