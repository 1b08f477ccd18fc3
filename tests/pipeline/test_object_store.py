"""A whole corpus on object storage: `filip build` with input and output in a bucket of a real
S3-compatible server (moto's, on 127.0.0.1: tests/s3_server.py), resumed after kill -9, reported by
`filip stats` (and `--html`), and streamed by `filip train` from the bucket."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.build import build
from pipeline.config import PipelineConfig
from pipeline.configtools import to_dict
from pipeline.decisions import decision_files
from pipeline.storage import Storage
from tests.pipeline.conftest import kill_when_found, make_config

REPO = Path(__file__).resolve().parents[2]
# Top-level entries every finished build leaves in its output folder.
RUN_ENTRIES = {"config.resolved.yaml", "input", "download", "inspect", "dedup", "unsafe", "decisions",
               "shards", "stats.json", "manifest.json"}


def s3_config(bucket: str) -> PipelineConfig:
    """The test build's config, reading the URL list from the bucket and writing beside it, with
    the trainer's tokenizer written beside the shards."""
    return make_config(f"{bucket}/input/urls.csv", f"{bucket}/out", shards={"tokenizer_vocab_size": 300})


def upload_url_list(s3_server, url_list_path: Path, bucket: str) -> None:
    s3_server.filesystem().put(str(url_list_path), f"{bucket.removeprefix('s3://')}/input/urls.csv")


def read_decisions(output: str) -> list[dict]:
    storage = Storage(output)
    files = decision_files(storage)
    assert files, f"{output}: no decisions"
    table = pa.concat_tables(storage.read_parquet(rel) for rel in files)
    return sorted(table.to_pylist(), key=lambda row: row["row_id"])


@pytest.fixture(scope="module")
def s3_run(s3_server, url_list, ray_session) -> tuple[str, dict, list]:
    """One uninterrupted build with its input and output in a bucket."""
    bucket = s3_server.new_bucket()
    upload_url_list(s3_server, url_list[0], bucket)
    summary = build(s3_config(bucket), progress=lambda message: None)
    return f"{bucket}/out", summary, url_list[1]


def test_every_row_has_its_exact_status(s3_run) -> None:
    output, _, expected = s3_run
    decisions = read_decisions(output)
    assert [d["row_id"] for d in decisions] == list(range(len(expected)))
    assert [(d["url"], d["status"], d["reason"]) for d in decisions] == \
        [(e.url, e.status, e.reason) for e in expected]
    for row_id, item in enumerate(expected):
        if item.duplicate_of_row is not None:
            assert decisions[row_id]["duplicate_of"] == decisions[item.duplicate_of_row]["key"], item


def test_outputs_are_in_the_bucket(s3_run, s3_server) -> None:
    output, summary, expected = s3_run
    fs, root = s3_server.filesystem(), output.removeprefix("s3://")
    assert RUN_ENTRIES <= {path.rsplit("/", 1)[-1] for path in fs.ls(root)}
    assert json.loads(fs.cat(f"{root}/stats.json")) == summary
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    tars = sorted(path.rsplit("/", 1)[-1] for path in fs.glob(f"{root}/shards/*.tar"))
    assert tars == sorted(shard["name"] for shard in manifest["shards"])
    kept = sum(1 for e in expected if e.status == "kept")
    assert summary["final_shards"]["samples"] == kept
    assert fs.size(f"{root}/shards/tokenizer.model") > 0
    assert [path for path in fs.find(root) if "/.tmp-" in path] == []


def _build_process(config_path: Path, address: str) -> subprocess.Popen:
    # The subprocess inherits the S3 server's environment from this process (set by s3_server).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(config_path),
                             "--ray-address", address], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_kill_matches_uninterrupted(s3_run, s3_server, url_list, tmp_path) -> None:
    import ray

    bucket = s3_server.new_bucket()
    upload_url_list(s3_server, url_list[0], bucket)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(s3_config(bucket))))
    fs, root = s3_server.filesystem(), f"{bucket.removeprefix('s3://')}/out"
    address = ray.get_runtime_context().gcs_address
    # Killed with one download shard complete and the others in flight.
    kill_when_found(_build_process(config_path, address), fs.glob, f"{root}/download/*.done",
                    deadline_s=300, poll_s=0.1)
    assert not fs.exists(f"{root}/stats.json"), "the run finished before it was killed"
    done_before = len(fs.glob(f"{root}/download/*.done"))
    assert 1 <= done_before < len(s3_run[1]["shards"])
    resumed = _build_process(config_path, address)
    _, stderr = resumed.communicate(timeout=500)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert [path for path in fs.find(root) if "/.tmp-" in path] == [], "temporaries left behind"
    got, reference = read_decisions(f"{bucket}/out"), read_decisions(s3_run[0])
    assert got == reference
    assert json.loads(fs.cat(f"{root}/manifest.json"))["shards"] == \
        json.loads(s3_server.filesystem().cat(f"{s3_run[0].removeprefix('s3://')}/manifest.json"))["shards"]


def test_stats_and_html_report_read_the_bucket(s3_run, s3_server, capsys) -> None:
    from pipeline.cli import main

    output = s3_run[0]
    assert main(["stats", output]) == 0
    printed = capsys.readouterr().out
    assert "failed: http_404" in printed and "dropped: near_duplicate" in printed
    report = f"{output}/report.html"
    assert main(["stats", output, "--html", report]) == 0
    html = s3_server.filesystem().cat(report.removeprefix("s3://")).decode()
    assert 'id="funnel-table"' in html and "near_duplicate" in html
    assert f"Output: {output}" in html
    assert "gallery-item" in html  # thumbnails read from the tars in the bucket


def test_train_streams_the_shards_from_the_bucket(s3_run, tmp_path) -> None:
    from filip.trainer import main
    from tests.filip.conftest import tiny_train_config, write_config

    shards = f"{s3_run[0]}/shards"
    config = tiny_train_config(Path("unused"), tmp_path / "run", max_steps=3, batch_size=8, num_workers=1)
    config["data"]["shards"] = shards
    config["run"].update(log_every=1, checkpoint_every=3)
    assert main([str(write_config(config, tmp_path / "train.yaml"))]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    assert resolved["data"]["tokenizer"] == f"{shards}/tokenizer.model"


def test_shard_specs_expand_to_bucket_urls(s3_run) -> None:
    from filip.data import expand_shards

    shards = f"{s3_run[0]}/shards"
    names = sorted(shard["name"].removesuffix(".tar")
                   for shard in json.loads(Storage(s3_run[0]).read_bytes("manifest.json"))["shards"])
    every = [f"{shards}/{name}.tar" for name in names]
    assert expand_shards(shards) == every
    assert expand_shards(f"{shards}/*.tar") == every
    assert expand_shards(f"{shards}/{{{names[0]}..{names[1]}}}.tar") == every[:2]
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shards(f"{shards}/missing-*.tar")
