"""The config of every `filip` command that reads one: the same mistake gets the same one-line
message from `filip build` and `filip train`, and `--set KEY=VALUE` overrides any key of each
command's config (the resolved config written beside the run shows it) or is refused naming the key.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.filip.conftest import build_flickr_shards

BUILD = "run: {input: URLS, output: OUT, seed: 0}\ndownload: {timeout: 5}\n"
TRAIN = ("run: {output_dir: OUT, max_steps: 1, progress_bar: false, seed: 0}\nmodel: {preset: tiny}\n"
         "data: {shards: SHARDS, batch_size: 8, num_workers: 0}\noptim: {lr: 0.01}\n")
SEED_ERROR = "run.seed: {} is out of range [0, 4294967295]"

# (id, (old, new) edit of the config text, --set options, the message after "error: ")
# `{file}` is the config's path; `...` ends a prefix (the known keys differ between the configs).
MISTAKES = [
    ("unknown-key", ("seed: 0", "sead: 0"), [],
     "{file}: unknown key run.sead, did you mean run.seed? (known keys here: ..."),
    ("missing-required-key", ("run: {", "# run: {"), [], "{file}: missing required key run"),
    ("wrong-type", ("seed: 0", "seed: many"), [], "{file}: run.seed: expected an integer, got str 'many'"),
    ("out-of-range", ("seed: 0", "seed: -1"), [], "{file}: " + SEED_ERROR.format(-1)),
    ("invalid-yaml", ("run: {", "run: @{"), [], ("{file}: not valid YAML: line 1, column 6: while scanning "
                                                "for the next token found character that cannot start any token")),
    ("duplicate-key", ("seed: 0", "seed: 0, seed: 1"), [], "{file}: duplicate key run.seed (lines 1 and 1)"),
    ("set-syntax", None, ["--set", "run.seed"],
     "--set 'run.seed': expected KEY=VALUE with a dotted KEY, e.g. --set run.seed=1"),
    ("set-key-syntax", None, ["--set", "run..seed=1"],
     "--set 'run..seed=1': expected KEY=VALUE with a dotted KEY, e.g. --set run.seed=1"),
    ("set-not-yaml", None, ["--set", "run.seed=[1"], "--set run.seed: not valid YAML: ..."),
    ("set-unknown-key", None, ["--set", "run.sed=1"],
     "{file}: unknown key run.sed, did you mean run.seed? (known keys here: ..."),
    ("set-out-of-range", None, ["--set", "run.seed=4294967296"], "{file}: " + SEED_ERROR.format(4294967296)),
    ("set-below-a-value", None, ["--set", "run.seed.low=1"],
     "{file}: run.seed: expected a mapping to set run.seed.low in, got int 0"),
]
# A choice among a Literal: each config has its own such key, with the one message shape.
CHOICES = {"build": ("run.input_format", ['auto', 'parquet', 'csv', 'tsv', 'jsonl']),
           "train": ("run.device", ['auto', 'cpu', 'cuda'])}


def _config(command: str, folder: Path) -> tuple[Path, Path, str]:
    """The path for a config of `command` in `folder`, the output it names, and its valid text."""
    text = BUILD if command == "build" else TRAIN
    output = folder / "out"
    replaced = text.replace("URLS", str(folder / "urls.csv")).replace("OUT", str(output))
    return folder / f"{command}.yaml", output, replaced.replace("SHARDS", str(folder / "shards"))


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0][len("error: "):]


def _matches(line: str, expected: str) -> bool:
    return line.startswith(expected[:-3]) if expected.endswith("...") else line == expected


@pytest.mark.parametrize("edit, options, expected", [case[1:] for case in MISTAKES],
                         ids=[case[0] for case in MISTAKES])
def test_build_and_train_answer_a_mistake_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                edit: tuple[str, str] | None, options: list[str],
                                                expected: str) -> None:
    answers = {}
    for command in ("build", "train"):
        folder = tmp_path / command
        folder.mkdir()
        config, output, text = _config(command, folder)
        config.write_text(text.replace(*edit, 1) if edit else text)
        line = _error_line(capsys, [command, str(config), *options])
        assert _matches(line, expected.format(file=config)), line
        assert not output.exists()  # refused before any work
        answers[command] = line.replace(str(config), "FILE").partition(" (known keys here:")[0]
    assert answers["build"] == answers["train"]


@pytest.mark.parametrize("command", ["build", "train"])
def test_a_bad_choice_lists_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    config, output, text = _config(command, tmp_path)
    config.write_text(text)
    key, choices = CHOICES[command]
    line = _error_line(capsys, [command, str(config), "--set", f"{key}=fast"])
    assert line == f"{config}: {key}: expected one of {choices}, got 'fast'"
    assert not output.exists()


def test_build_set_overrides_reach_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       ray_session) -> None:
    config, output, text = _config("build", tmp_path)
    config.write_text(text)
    (tmp_path / "urls.csv").write_text("url,caption\n")  # no rows: the build is quick, the config real
    argv = ["build", str(config), "--set", "download.timeout=2.5", "--set", "unsafe.enabled=false",
            "--set", "backtranslation.enabled=false", "--set", "download.allow_networks=[127.0.0.1/32]",
            "--set", "inspect.caption.max_chars=77"]
    assert main(argv) == 0, capsys.readouterr().err
    resolved = yaml.safe_load((output / "config.resolved.yaml").read_text())
    assert resolved["download"]["timeout"] == 2.5 and resolved["download"]["allow_networks"] == ["127.0.0.1/32"]
    assert (resolved["unsafe"]["enabled"], resolved["backtranslation"]["enabled"]) == (False, False)
    assert (resolved["inspect"]["caption"]["max_chars"], resolved["run"]["seed"]) == (77, 0)


def test_train_set_overrides_reach_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flickr_dir: Path) -> None:
    config, output, text = _config("train", tmp_path)
    config.write_text(text)
    build_flickr_shards(tmp_path / "shards", 16, 16, vocab_size=300, max_side=64, flickr_dir=flickr_dir)
    argv = ["train", str(config), "--set", "run.seed=7", "--set", "optim.name=adamw", "--set",
            "model.vision_layers=1", "--set", "optim.betas=[0.8, 0.9]", "--set", "run.cpu_threads=1"]
    assert main(argv) == 0, capsys.readouterr().err
    resolved = yaml.safe_load((output / "config.resolved.yaml").read_text())
    assert (resolved["run"]["seed"], resolved["optim"]["name"], resolved["optim"]["betas"]) == (7, "adamw", [0.8, 0.9])
    assert resolved["model"] == {"preset": "tiny", "vision_layers": 1}


def test_demo_set_is_checked_before_the_sample_web_is_made(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["demo", "--skip-train", "--output", str(tmp_path / "demo"),
                                "--set", "download.timeout=0"])
    assert line.endswith("configs/demo.yaml: download.timeout: 0.0 is out of range (0, inf)")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the sample web
