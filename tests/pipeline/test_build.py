"""A real build: Ray, img2dataset, Flickr8k photos on a loopback server with faults injected."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.build import build
from tests.pipeline.conftest import make_config, write_flickr_url_list

N_IMAGES = 40
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, flickr_web, flickr_captions):
    path = tmp_path_factory.mktemp("urls") / "urls.csv"
    expected = write_flickr_url_list(path, flickr_web, flickr_captions, N_IMAGES)
    return path, expected


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, url_list, ray_session):
    """One uninterrupted build, shared by the assertions below and the resume comparisons."""
    path, expected = url_list
    out = tmp_path_factory.mktemp("reference") / "out"
    config = make_config(path, out)
    summary = build(config, progress=lambda msg: None)
    return out, summary, expected


def test_every_row_has_its_exact_status(reference_run) -> None:
    out, _, expected = reference_run
    decisions = pq.read_table(out / "decisions.parquet").to_pylist()
    assert [d["row_id"] for d in decisions] == list(range(len(expected)))
    got = [(d["url"], d["status"], d["reason"]) for d in decisions]
    assert got == [(url, status, reason) for url, status, reason in expected]


def test_conservation_per_stage(reference_run) -> None:
    out, summary, expected = reference_run
    stats = json.loads((out / "stats.json").read_text())
    assert stats == summary
    for stage in stats["stages"]:
        assert stage["rows_in"] == stage["rows_out"] + sum(stage["dropped"].values()) + sum(
            stage["failed"].values()), stage
    assert stats["stages"][0]["rows_in"] == len(expected)
    download = next(s for s in stats["stages"] if s["stage"] == "download")
    assert download["failed"] == {"http_404": 1, "http_500": 1, "not_an_image": 1, "redirect_loop": 1,
                                  "truncated_image": 1, "timeout": 1}
    assert download["dropped"] == {"robots_optout": 1}
    assert download["rows_out"] == N_IMAGES


def test_download_folder_is_img2dataset_format(reference_run) -> None:
    out, summary, _ = reference_run
    for shard in summary["shards"]:
        assert (out / "download" / f"{shard}_stats.json").exists()
        table = pq.read_table(out / "download" / f"{shard}.parquet")
        for column in ("url", "caption", "key", "status", "error_message", "width", "height",
                       "original_width", "original_height", "sha256", "row_id", "source_index"):
            assert column in table.column_names
        ok = [r for r in table.to_pylist() if r["status"] == "success"]
        with tarfile.open(out / "download" / f"{shard}.tar") as archive:
            names = archive.getnames()
            for row in ok:
                assert {f"{row['key']}.jpg", f"{row['key']}.txt", f"{row['key']}.json"} <= set(names)
                assert row["original_width"] > 0 and min(row["width"], row["height"]) <= 256
                meta = json.load(archive.extractfile(f"{row['key']}.json"))
                assert meta["row_id"] == row["row_id"]
        assert len([n for n in names if n.endswith(".jpg")]) == len(ok)


def _tree_digest(out: Path) -> dict:
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    digest = {"decisions": pq.read_table(out / "decisions.parquet").to_pylist()}
    stats = json.loads((out / "stats.json").read_text())
    for stage in stats["stages"]:
        stage.pop("seconds")
    digest["stats"] = stats
    for tar in sorted((out / "download").glob("*.tar")):
        with tarfile.open(tar) as archive:
            digest[tar.name] = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()
                                and not m.name.endswith(".json")}
    for path in sorted((out / "download").glob("[0-9]*.parquet")):
        table = pq.read_table(path).drop_columns(["error_message"]).sort_by("key")
        digest[path.name] = table.to_pylist()
    return digest


def _build_process(config_path: Path, address: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(config_path),
                             "--ray-address", address], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, out: Path, pattern: str, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and process.poll() is None:
        if list(out.glob(pattern)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            return
        time.sleep(0.05)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"never saw {pattern} before the run ended (rc={process.poll()})")


@pytest.mark.parametrize("kill_at", [
    "config.resolved.yaml",           # before or during the input stage
    "download/.tmp-*",                # in the middle of a download shard
    "download/00000.done",            # between two shards
])
def test_resume_after_kill_matches_uninterrupted(tmp_path, url_list, reference_run, ray_session,
                                                 kill_at) -> None:
    import ray
    import yaml

    path, _ = url_list
    out = tmp_path / "out"
    config_path = tmp_path / "config.yaml"
    config = make_config(path, out)
    from pipeline.configtools import to_dict

    config_path.write_text(yaml.safe_dump(to_dict(config)))
    address = ray.get_runtime_context().gcs_address
    _kill_when(_build_process(config_path, address), out, kill_at)
    resumed = _build_process(config_path, address)
    _, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert not list(out.glob("**/.tmp-*")), "temporaries left behind"
    assert _tree_digest(out) == _tree_digest(reference_run[0])


def test_cli_build_and_stats(tmp_path, url_list, reference_run, capsys) -> None:
    from pipeline.cli import main

    assert main(["stats", str(reference_run[0])]) == 0
    text = capsys.readouterr().out
    assert "download" in text and "failed: http_404" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_output_with_other_config_is_refused(tmp_path, url_list, reference_run) -> None:
    from pipeline.build import OutputInUse

    path, _ = url_list
    config = make_config(path, reference_run[0], download={"timeout": 7.0})
    with pytest.raises(OutputInUse, match="another config"):
        build(config, progress=lambda msg: None)
