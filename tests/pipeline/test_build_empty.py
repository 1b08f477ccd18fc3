"""A build with no row left completes: an empty URL list, every row refused at input, failing to
download, or dropped by inspect. It writes decisions/ with every row's status, stats.json and
a manifest of zero shards, and `filip stats` reads it. A shard whose rows all failed beside one that
keeps rows is searched for duplicates and sharded without the empty one."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.build import build
from pipeline.cli import main
from pipeline.testweb import serve_web
from tests.pipeline.conftest import MIN_SIDE, make_config

STAGES = ["input", "download", "inspect", "dedup", "unsafe", "backtranslate"]


def _closed_port() -> int:
    # A port just released by the kernel: nothing listens there, so a connection is refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_urls(path: Path, urls: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        writer.writerows((url, f"a photo number {i} of a thing") for i, url in enumerate(urls))
    return path


@pytest.fixture(scope="module")
def small_web(tmp_path_factory):
    """Three images below inspect's minimum side and two large noise images (distinct pHashes)."""
    root = tmp_path_factory.mktemp("small-web")
    for i in range(3):
        Image.new("RGB", (MIN_SIDE // 2 + i, MIN_SIDE // 3), (60 * i, 90, 30)).save(root / f"tiny{i}.png")
    noise = np.random.default_rng(0)
    for i in range(2):
        pixels = noise.integers(0, 256, (MIN_SIDE + 40, MIN_SIDE + 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"big{i}.png")
    with serve_web(root) as base_url:
        yield base_url


# case -> (URLs, the (status, stage, reason) every row must get)
def _case(name: str, web: str) -> tuple[list[str], tuple[str, str, str] | None]:
    if name == "empty_input":
        return [], None
    if name == "refused_at_input":
        return [f"ftp://example.com/{i}.jpg" for i in range(4)], ("dropped", "input", "unsupported_scheme")
    if name == "failed_download":
        port = _closed_port()
        return ([f"http://127.0.0.1:{port}/{i}.jpg" for i in range(4)],
                ("failed_download", "download", "connection_refused"))
    return [f"{web}/img/tiny{i}.png" for i in range(3)], ("dropped", "inspect", "too_small")


@pytest.mark.parametrize("case", ["empty_input", "refused_at_input", "failed_download", "dropped_by_inspect"])
def test_build_with_no_row_left_completes(case, small_web, tmp_path, ray_session, capsys) -> None:
    urls, outcome = _case(case, small_web)
    out = tmp_path / "out"
    said: list[str] = []
    config = make_config(_write_urls(tmp_path / "urls.csv", urls), out, unsafe={"enabled": False},
                         shards={"tokenizer_vocab_size": 300})
    summary = build(config, progress=said.append)

    decisions = pq.read_table(out / "decisions").sort_by("row_id").to_pylist()
    assert [(d["row_id"], d["url"]) for d in decisions] == list(enumerate(urls))
    assert {(d["status"], d["stage"], d["reason"]) for d in decisions} == ({outcome} if urls else set())
    stats = json.loads((out / "stats.json").read_text())
    assert stats == summary
    assert [s["stage"] for s in stats["stages"]] == STAGES
    assert stats["stages"][-1]["rows_out"] == 0
    for stage in stats["stages"]:
        assert stage["rows_in"] == stage["rows_out"] + sum(stage["dropped"].values()) + sum(
            stage["failed"].values()), stage
    assert summary["final_shards"] == {"shards": 0, "samples": 0}
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["shards"], manifest["total_samples"], manifest["tokenizer"]) == ([], 0, None)
    because = "every one of the" if urls else "the input URL list holds no rows"
    assert any(line.startswith(f"[shards] no rows left: {because}") for line in said), said

    capsys.readouterr()
    assert main(["stats", str(out), "--html", str(tmp_path / "report.html")]) == 0
    printed = capsys.readouterr().out
    assert "kept overall" in printed and (outcome is None or f"{outcome[2]}" in printed)
    assert (tmp_path / "report.html").stat().st_size > 0


def test_shard_with_no_row_left_beside_a_kept_one(small_web, tmp_path, ray_session) -> None:
    # Shard 00000 fails entirely (its inspect file then lacks the pHash column); 00001 keeps both.
    port = _closed_port()
    urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(2)] + [f"{small_web}/img/big{i}.png"
                                                                      for i in range(2)]
    out = tmp_path / "out"
    # The search in the driver: the cheaper one in a test, and it read the first file's columns too.
    config = make_config(_write_urls(tmp_path / "urls.csv", urls), out, run={"shard_size": 2},
                         unsafe={"enabled": False}, dedup={"single_machine_max_rows": 100})
    summary = build(config, progress=lambda msg: None)

    decisions = pq.read_table(out / "decisions").sort_by("row_id").to_pylist()
    assert [(d["status"], d["reason"]) for d in decisions] == [
        ("failed_download", "connection_refused"), ("failed_download", "connection_refused"),
        ("kept", None), ("kept", None)]
    assert summary["final_shards"] == {"shards": 1, "samples": 2}
    dedup = next(s for s in summary["stages"] if s["stage"] == "dedup")
    assert (dedup["rows_in"], dedup["counters"]["search_rows"]) == (2, 2)
    shard = pq.read_table(out / "shards_parquet" / "00000.parquet")
    assert sorted(shard["url"].to_pylist()) == urls[2:]


def test_a_download_only_build_writes_final_shards(small_web, tmp_path, ray_session) -> None:
    """`stages: [download]`, img2dataset's job alone: every fetched image is kept (the tiny ones
    too: no inspect) and the final shards carry the download's own bytes."""
    import tarfile

    urls = [f"{small_web}/img/tiny{i}.png" for i in range(3)] + [f"{small_web}/img/big{i}.png" for i in range(2)]
    out = tmp_path / "out"
    config = make_config(_write_urls(tmp_path / "urls.csv", urls), out, shards={"tokenizer_vocab_size": 300})
    config.stages = ["download"]
    summary = build(config, progress=lambda line: None)
    assert [s["stage"] for s in summary["stages"] if not s.get("skipped")] == ["input", "download"]
    assert summary["final_shards"]["samples"] == 5
    decisions = pq.read_table(out / "decisions").to_pylist()
    assert sorted(d["status"] for d in decisions) == ["kept"] * 5
    downloaded = {}
    for shard in summary["shards"]:
        with tarfile.open(out / "download" / f"{shard}.tar") as archive:
            downloaded.update({m.name: archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")})
    final = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as archive:
            final.update({m.name: archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")})
    assert final == downloaded and len(final) == 5
