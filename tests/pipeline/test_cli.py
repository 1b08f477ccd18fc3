"""The `filip` command line: help for every command, without heavy imports for the top level."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_top_level_help_imports_neither_torch_nor_ray() -> None:
    probe = ("import sys; from pipeline.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    result = _run("-c", probe)
    assert "filip build CONFIG" in result.stdout
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize("command, expected", [
    ("build", "--ray-address"), ("stats", "--html"), ("demo", "--skip-train"),
    ("retry-failed", "--reason"), ("train", "--resume"), ("eval", "--zeroshot"), ("align", "--out"),
])
def test_every_command_explains_itself(command, expected, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("run:\n  input: x.parquet\n  output: out\n  shard_sise: 3\n")
    assert main(["build", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "shard_sise" in err
