"""Fixtures for pipeline tests: the Flickr8k photos served on 127.0.0.1 with injected faults."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, config_from_dict
from pipeline.testweb import serve_web

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


@pytest.fixture(scope="session")
def flickr_captions(flickr_dir: Path) -> list[dict]:
    with (flickr_dir / "captions.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def flickr_web(flickr_dir: Path):
    """Base URL of a loopback server over flickr8k-1k (images under /img/images/NAME)."""
    with serve_web(flickr_dir, slow_seconds=3.0) as base_url:
        yield base_url


def write_flickr_url_list(path: Path, base_url: str, captions: list[dict], n_images: int,
                          with_faults: bool = True) -> list[tuple[str, str, str | None]]:
    """One row per image (its first caption) plus one row per fault; returns the expected
    (url, status, reason) of every row in order (status 'kept' for the good images)."""
    seen, expected = set(), []
    rows = []
    for row in captions:
        if row["image"] in seen:
            continue
        seen.add(row["image"])
        url = f"{base_url}/img/images/{row['image']}"
        rows.append((url, row["caption"]))
        expected.append((url, "kept", None))
        if len(seen) == n_images:
            break
    if with_faults:
        names = sorted(seen)
        for i, (route, status, reason) in enumerate(FAULTS):
            url = base_url + route.format(name=f"images/{names[i]}") + f"?fault={i}"
            rows.append((url, f"fault {reason}"))
            expected.append((url, status, reason))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "source_index"])
        for i, (url, caption) in enumerate(rows):
            writer.writerow([url, caption, i])
    return expected


def make_config(input_path: Path, output: Path, **sections) -> PipelineConfig:
    data = {"run": {"input": str(input_path), "output": str(output), "shard_size": 16,
                    "allow_private_networks": True},
            "download": {"thread_count": 8, "timeout": 1.5, "resources": {"num_cpus": 1}}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)
