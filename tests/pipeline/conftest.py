"""Fixtures for pipeline tests: Flickr8k photos on a loopback server, with injected faults and
planted duplicates, and tiny MarianMT models for the back-translation stage."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image, ImageEnhance

from pipeline.config import PipelineConfig, config_from_dict
from pipeline.testweb import serve_web

N_IMAGES = 40
MIN_SIDE = 100  # Flickr8k-1k photos are small (median shorter side 150 px)

# Each fault URL and the exact (status, reason) the pipeline must record for it.
FAULTS = [
    ("/status/404", "failed_download", "http_404"),
    ("/status/500", "failed_download", "http_500"),
    ("/notimage/1", "failed_download", "not_an_image"),
    ("/loop/1", "failed_download", "redirect_loop"),
    ("/truncated/{name}", "failed_download", "truncated_image"),
    ("/slow/{name}", "failed_download", "timeout"),
    ("/noai/{name}", "dropped", "robots_optout"),
]


def _resized(img: Image.Image) -> Image.Image:
    return img.resize((int(img.width * 0.8), int(img.height * 0.8)))


def _cropped(img: Image.Image) -> Image.Image:
    # 1.5% off each side (about 6% of the area): the crop size that the default threshold
    # always catches in bench/dedup_quality.py; 5% crops are caught 99% of the time only.
    dx, dy = round(img.width * 0.015), round(img.height * 0.015)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _brightened(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.15)


# (name, transform, JPEG quality, same caption as the original?, expected reason)
PLANTS = [
    ("exact", None, None, False, "exact_duplicate"),
    ("exact_same_caption", None, None, True, "duplicate_caption_and_image"),
    ("resized", _resized, 90, False, "near_duplicate"),
    ("recompressed", lambda im: im, 50, False, "near_duplicate"),
    ("cropped", _cropped, 90, False, "near_duplicate"),
    ("brightened", _brightened, 90, False, "near_duplicate"),
]


@dataclass
class ExpectedRow:
    url: str
    status: str
    reason: str | None
    duplicate_of_row: int | None = None  # the row whose key a dropped duplicate must name


@pytest.fixture(scope="session")
def flickr_captions(flickr_dir: Path) -> list[dict]:
    with (flickr_dir / "captions.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def web_root(tmp_path_factory, flickr_dir: Path, flickr_captions: list[dict]):
    """A served folder with the first N_IMAGES Flickr photos (one caption each) and planted copies."""
    root = tmp_path_factory.mktemp("web")
    (root / "images").mkdir()
    (root / "planted").mkdir()
    chosen: list[tuple[str, str]] = []
    for row in flickr_captions:
        if row["image"] not in {name for name, _ in chosen}:
            chosen.append((row["image"], row["caption"]))
            shutil.copy(flickr_dir / "images" / row["image"], root / "images" / row["image"])
        if len(chosen) == N_IMAGES:
            break
    return root, chosen


@pytest.fixture(scope="session")
def flickr_web(web_root):
    with serve_web(web_root[0], slow_seconds=3.0) as base_url:
        yield base_url


def _expected_inspect_reason(path: Path) -> str | None:
    with Image.open(path) as img:
        w, h = img.size
    if min(w, h) < MIN_SIDE:
        return "too_small"
    if max(w, h) / min(w, h) > 3.0:
        return "bad_aspect_ratio"
    return None


def write_flickr_url_list(path: Path, base_url: str, web_root) -> list[ExpectedRow]:
    """Good images, faults, then planted duplicates (so copies land in other shards than their
    originals). Returns the expected outcome of every row, in order."""
    root, chosen = web_root
    rows: list[tuple[str, str]] = []
    expected: list[ExpectedRow] = []
    for name, caption in chosen:
        url = f"{base_url}/img/images/{name}"
        reason = _expected_inspect_reason(root / "images" / name)
        rows.append((url, caption))
        expected.append(ExpectedRow(url, "dropped" if reason else "kept", reason))
    for i, (route, status, reason) in enumerate(FAULTS):
        url = base_url + route.format(name=f"images/{chosen[i][0]}") + f"?fault={i}"
        rows.append((url, f"fault {reason}"))
        expected.append(ExpectedRow(url, status, reason))
    good = [i for i, e in enumerate(expected[:len(chosen)]) if e.status == "kept"]
    big = [i for i in good if min(Image.open(root / "images" / chosen[i][0]).size) >= 150]
    for (label, transform, quality, same_caption, reason), original in zip(PLANTS, big[-len(PLANTS):]):
        name, caption = chosen[original]
        if transform is None:
            url = f"{base_url}/img/images/{name}?copy={label}"
        else:
            img = transform(Image.open(root / "images" / name).convert("RGB"))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=quality)
            (root / "planted" / f"{label}-{name}").write_bytes(buffer.getvalue())
            url = f"{base_url}/img/planted/{label}-{name}"
        rows.append((url, caption if same_caption else f"{label} copy of a photo: {caption}"))
        expected.append(ExpectedRow(url, "dropped", reason, duplicate_of_row=original))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "source_index"])
        for i, (url, caption) in enumerate(rows):
            writer.writerow([url, caption, i])
    return expected


@pytest.fixture(scope="session")
def tiny_marian_models(tmp_path_factory, flickr_captions) -> dict[str, str]:
    from tests.tiny_marian import build_tiny_marian_models

    corpus = [row["caption"] for row in flickr_captions[:2000]]
    return build_tiny_marian_models(tmp_path_factory.mktemp("marian"), corpus)


def make_config(input_path: Path, output: Path, models: dict[str, str] | None = None,
                **sections) -> PipelineConfig:
    data = {"run": {"input": str(input_path), "output": str(output), "shard_size": 16},
            # The narrowest allowance that reaches the test web: the guard runs in every test.
            "download": {"thread_count": 8, "timeout": 1.5, "allow_networks": ["127.0.0.1/32"],
                         "resources": {"num_cpus": 1}},
            "inspect": {"resolution": {"min_side": MIN_SIDE}},
            # The Ray shuffle search, as on a cluster (the demo test runs the in-driver search).
            "dedup": {"single_machine_max_rows": 0},
            "backtranslation": {"enabled": models is not None, "models": models or {}, "batch_size": 32,
                                "max_new_tokens": 24} if models else {"enabled": False},
            "shards": {"samples_per_shard": 8}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


@pytest.fixture(scope="session")
def url_list(tmp_path_factory, flickr_web, web_root):
    path = tmp_path_factory.mktemp("urls") / "urls.csv"
    return path, write_flickr_url_list(path, flickr_web, web_root)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, url_list, tiny_marian_models, ray_session):
    """One uninterrupted build through every stage, shared by the assertions and the resume tests."""
    from pipeline.build import build

    path, expected = url_list
    out = tmp_path_factory.mktemp("reference") / "out"
    config = make_config(path, out, tiny_marian_models)
    summary = build(config, progress=lambda msg: None)
    return out, summary, expected, config


def kill_when_found(process: subprocess.Popen, glob: Callable[[str], list], pattern: str,
                    deadline_s: float, poll_s: float) -> None:
    """SIGKILL `process`'s group as soon as `glob(pattern)` finds something (a crash at that point
    of the build); fails if the run ended first or `deadline_s` passed."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and process.poll() is None:
        if glob(pattern):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            return
        time.sleep(poll_s)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"never saw {pattern} before the run ended (rc={process.poll()})")
