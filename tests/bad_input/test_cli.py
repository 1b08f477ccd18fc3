"""Every `filip` command fails on bad input the same way: one line `error: <message>` naming the file
or key, exit 2, no traceback; a bug prints its traceback and exits 1. A failed build costs no resume.

Each case runs the real command as a subprocess (tests/bad_input/cli.py), as a user's shell would.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.decisions import SCHEMA
from tests.bad_input.cli import REPO_ROOT, assert_user_error, run_filip

Case = Callable[[Path], tuple[list, list[str]]]


def _urls(path: Path, count: int = 3, url: str = "ftp://example.com/{i}.jpg") -> Path:
    lines = ["url,caption"] + [f"{url.format(i=i)},a photo number {i}" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp: Path, name: str = "build.yaml", **run) -> Path:
    """A build config of the cheap stages; its input's rows are all refused unless `run` says otherwise."""
    data = {"run": {"input": str(_urls(tmp / "urls.csv")), "output": str(tmp / "out"), **run},
            "download": {"timeout": 2.0, "allow_networks": ["127.0.0.1/32"]},
            "dedup": {"single_machine_max_rows": 1000},
            "unsafe": {"enabled": False}, "backtranslation": {"enabled": False}}
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def _binary(tmp: Path) -> Path:
    path = tmp / "binary.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    return path


def _a_file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a folder\n")
    return path


def _input_folder(tmp: Path) -> Path:
    folder = tmp / "lists"
    folder.mkdir()
    _urls(folder / "urls.csv")
    return folder


def _finished_run(tmp: Path) -> Path:
    """What `retry-failed` reads of a finished build: decisions.parquet and the input shards."""
    out = tmp / "run"
    (out / "input").mkdir(parents=True)
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(4)]
    pq.write_table(pa.table({"row_id": list(range(4)), "url": urls, "caption": ["c"] * 4}),
                   out / "input" / "00000.parquet")
    outcome = [("kept", None), ("failed_download", "connection_refused"),
               ("failed_download", "connection_refused"), ("failed_download", "timeout")]
    pq.write_table(pa.table({"row_id": list(range(4)), "key": [f"0000{i}" for i in range(4)], "url": urls,
                             "caption": ["c"] * 4, "status": [o[0] for o in outcome],
                             "stage": ["download"] * 4, "reason": [o[1] for o in outcome],
                             "duplicate_of": [None] * 4}, schema=SCHEMA), out / "decisions.parquet")
    return out


def _train_config(tmp: Path, shards: Path) -> Path:
    data = yaml.safe_load((REPO_ROOT / "configs" / "train-tiny.yaml").read_text())
    data["data"]["shards"] = str(shards)
    data["run"]["output_dir"] = str(tmp / "train-run")
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _shards_without_tokenizer(tmp: Path) -> Path:
    folder = tmp / "shards"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(b"")
    return folder


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02")
    return path


def _image(tmp: Path) -> Path:
    from PIL import Image

    path = tmp / "photo.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def _not_an_image(tmp: Path) -> Path:
    path = tmp / "notimage.jpg"
    path.write_text("<html>an error page served as image/jpeg</html>\n")
    return path


needs_no_s3fs = pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
needs_no_gcsfs = pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                                    reason="gcsfs is installed")
not_root = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")


def _read_only_output(tmp: Path) -> tuple[list, list[str]]:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return ["build", _config(tmp), "--output", locked / "out"], [str(locked / "out"), "cannot write"]


# id -> case: from a fresh folder, the command's arguments and what its error line must name.
BUILD_CASES: dict[str, tuple[Case, tuple]] = {
    "missing config": (lambda t: (["build", t / "nosuch.yaml"], [str(t / "nosuch.yaml"), "not found"]), ()),
    "binary config": (lambda t: (["build", _binary(t)], [str(t / "binary.yaml")]), ()),
    "config value out of range": (lambda t: (["build", _config(t, shard_size=0)],
                                             ["build.yaml", "run.shard_size"]), ()),
    "unknown config key": (lambda t: (["build", _config(t, shard_sise=3)],
                                      ["build.yaml", "run.shard_sise"]), ()),
    "input typo": (lambda t: (["build", _config(t), "--input", t / "urls.cvs"], [str(t / "urls.cvs")]), ()),
    "output is a file": (lambda t: (["build", _config(t), "--output", _a_file(t)],
                                    [str(t / "a-file"), "it is a file"]), ()),
    "output under a file": (lambda t: (["build", _config(t), "--output", _a_file(t) / "out"],
                                       [str(t / "a-file" / "out"), "Not a directory"]), ()),
    "output not writable": (_read_only_output, (not_root,)),
    "output inside the input folder": (lambda t: (["build", _config(t), "--input", _input_folder(t),
                                                   "--output", t / "lists" / "out"],
                                                  [str(t / "lists" / "out"), str(t / "lists")]), ()),
    "s3 output without s3fs": (lambda t: (["build", _config(t), "--output", "s3://bucket/corpus"],
                                          ["s3://bucket/corpus: install s3fs to use s3:// paths"]),
                               (needs_no_s3fs,)),
    "gs input without gcsfs": (lambda t: (["build", _config(t), "--input", "gs://bucket/urls.csv"],
                                          ["gs://bucket/urls.csv: install gcsfs to use gs:// paths"]),
                               (needs_no_gcsfs,)),
    "unknown storage protocol": (lambda t: (["build", _config(t), "--output", "nosuch://bucket/x"],
                                            ["nosuch://bucket/x", "nosuch"]), ()),
}
OTHER_CASES: dict[str, tuple[Case, tuple]] = {
    "stats without a build": (lambda t: (["stats", t], [str(t / "stats.json")]), ()),
    "stats html under a file": (lambda t: (["stats", _stats_only(t), "--html", _a_file(t) / "report.html"],
                                           [str(t / "a-file" / "report.html"), "cannot write"]), ()),
    "retry without a build": (lambda t: (["retry-failed", t, "--to", t / "retry.parquet"],
                                         [str(t / "decisions.parquet")]), ()),
    "retry to a path under a file": (lambda t: (["retry-failed", _finished_run(t), "--to",
                                                 _a_file(t) / "r.parquet"],
                                                [str(t / "a-file" / "r.parquet"), "cannot write"]), ()),
    "retry an unknown reason": (lambda t: (["retry-failed", _finished_run(t), "--to", t / "r.parquet",
                                            "--reason", "timeout", "--reason", "nosuch"],
                                           ["reason nosuch;", "reasons in this run: connection_refused (2), "
                                                              "timeout (1)"]), ()),
}
MODEL_CASES: dict[str, tuple[Case, tuple]] = {
    "train missing config": (lambda t: (["train", t / "nosuch.yaml"], [str(t / "nosuch.yaml")]), ()),
    "train binary config": (lambda t: (["train", _binary(t)], [str(t / "binary.yaml")]), ()),
    "train missing shards": (lambda t: (["train", _train_config(t, t / "noshards")],
                                        [str(t / "noshards")]), ()),
    "train missing tokenizer": (lambda t: (["train", _train_config(t, _shards_without_tokenizer(t))],
                                           [str(t / "shards" / "tokenizer.model")]), ()),
    "train --set without =": (lambda t: (["train", _train_config(t, t), "--set", "run.max_steps"],
                                         ["--set", "run.max_steps"]), ()),
    "train --set unknown key": (lambda t: (["train", _train_config(t, t), "--set", "run.max_stepz=3"],
                                           ["train.yaml", "run.max_stepz"]), ()),
    "train --set value not YAML": (lambda t: (["train", _train_config(t, t), "--set", "run.max_steps=[3"],
                                              ["--set run.max_steps"]), ()),
    "eval garbage checkpoint": (lambda t: (["eval", _garbage(t), "--localisation", "2"],
                                           [str(t / "garbage.pt")]), ()),
    "eval missing checkpoint": (lambda t: (["eval", t / "none.pt", "--localisation", "2"],
                                           [str(t / "none.pt")]), ()),
    "align garbage checkpoint": (lambda t: (["align", _garbage(t), _image(t), "a red square"],
                                            [str(t / "garbage.pt")]), ()),
    "align not an image": (lambda t: (["align", _garbage(t), _not_an_image(t), "a red square"],
                                      [str(t / "notimage.jpg"), "not an image"]), ()),
}


def _stats_only(tmp: Path) -> Path:
    out = tmp / "run"
    out.mkdir()
    (out / "stats.json").write_text('{"stages": [], "shards": [], "final_shards": {}}\n')
    return out


def _params(cases: dict[str, tuple[Case, tuple]]) -> list:
    return [pytest.param(case, id=name, marks=marks) for name, (case, marks) in cases.items()]


@pytest.mark.parametrize("case", _params(BUILD_CASES) + _params(OTHER_CASES))
def test_pipeline_command_reports_bad_input_in_one_line(case: Case, tmp_path: Path) -> None:
    args, names = case(tmp_path)
    line = assert_user_error(run_filip(*args), *names)
    assert "run: run." not in line  # a key is named once, not after its own section again
    # A refused build records no config, so the corrected command may use the same output folder.
    assert not list(tmp_path.rglob("config.resolved.yaml"))


@pytest.mark.parametrize("case", _params(MODEL_CASES))
def test_model_command_reports_bad_input_in_one_line(case: Case, tmp_path: Path) -> None:
    args, names = case(tmp_path)
    assert_user_error(run_filip(*args), *names)


def test_retry_failed_writes_the_asked_reason_atomically(tmp_path: Path) -> None:
    out = _finished_run(tmp_path)
    result = run_filip("retry-failed", out, "--to", tmp_path / "retry.parquet", "--reason", "timeout")
    assert result.returncode == 0, result.stderr[-3000:]
    assert pq.read_table(tmp_path / "retry.parquet")["url"].to_pylist() == ["http://127.0.0.1:9/3.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retry.parquet", "run"]  # no temporary left


def test_help_documents_exit_codes_and_debugging() -> None:
    result = run_filip("--help")
    assert result.returncode == 0
    for text in ("exit codes:", "0  success", "1  unexpected error", "2  expected error", "FILIP_DEBUG=1",
                 "filip -v COMMAND"):
        assert text in result.stdout, text


@pytest.mark.parametrize("how", ["-v", "FILIP_DEBUG=1"])
def test_debug_adds_the_traceback_of_an_expected_error(how: str, tmp_path: Path) -> None:
    args = ["-v"] if how == "-v" else []
    result = run_filip(*args, "stats", tmp_path, env={"FILIP_DEBUG": "1"} if how != "-v" else {})
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path / 'stats.json'}: no statistics yet (has `filip build` run?)"]


def test_unexpected_error_prints_its_traceback_and_exits_1(monkeypatch, capsys) -> None:
    # The one place a monkeypatch stands in for a bug: a command function that raises.
    import pipeline.cli as cli

    def broken(args) -> int:
        raise RuntimeError("a bug in the stats command")

    monkeypatch.setattr(cli, "_run_stats", broken)
    assert cli.main(["stats", "anywhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the stats command" in err
    assert not [line for line in err.splitlines() if line.startswith("error: ")]


def test_failed_build_then_corrected_command_completes(tmp_path: Path) -> None:
    # Every row is refused at input: a complete build without Ray, in seconds.
    config = _config(tmp_path)
    typo = tmp_path / "typo.csv"
    assert_user_error(run_filip("build", config, "--input", typo), str(typo))
    assert not (tmp_path / "out" / "config.resolved.yaml").exists()
    done = run_filip("build", config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "out" / "config.resolved.yaml").read_text())["run"]["input"] == str(
        tmp_path / "urls.csv")
    # No shard completed: another config takes the folder over, input stage included.
    other = _urls(tmp_path / "more.csv", count=5)
    again = run_filip("build", config, "--input", other)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "completed no shard; it is replaced (config changed: run.input:" in again.stdout
    stats = yaml.safe_load((tmp_path / "out" / "stats.json").read_text())
    assert stats["stages"][0]["rows_in"] == 5


def test_changed_config_after_a_completed_download_is_refused_naming_keys(tmp_path: Path,
                                                                         ray_session) -> None:
    address = ray_session.get_runtime_context().gcs_address
    # Both rows fail to download (nothing listens on port 9): the download stage completes its shard.
    config = _config(tmp_path, input=str(_urls(tmp_path / "fetch.csv", 2, "http://127.0.0.1:9/{i}.jpg")))
    first = run_filip("build", config, "--ray-address", address)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "out" / "download" / "00000.done").exists()
    data = yaml.safe_load(config.read_text())
    data["download"]["timeout"] = 3.0
    data["run"]["shard_size"] = 5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    line = assert_user_error(run_filip("build", changed, "--ray-address", address),
                             str(tmp_path / "out" / "config.resolved.yaml"),
                             "(download.timeout: 2.0 -> 3.0; run.shard_size: 10000 -> 5)",
                             "completed shards (dedup, download, inspect)")
    assert "ray_address" not in line
