"""`filip eval` end to end: every task, JSON and Markdown outputs, both loss kinds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from filip.evaluate import add_cli_arguments, cli_main, format_markdown


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


def test_eval_writes_json_and_markdown(tiny_checkpoint: Path, cifar_dir: Path, flickr_dir: Path,
                                       tmp_path: Path, capsys) -> None:
    argv = [str(tiny_checkpoint), "--zeroshot", str(cifar_dir), "--max-per-class", "5",
            "--retrieval", str(flickr_dir / "captions.csv"), "--max-images", "20",
            "--linear-probe", str(cifar_dir), "--localisation", "10", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "a")]
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert results["loss_kind"] == "filip" and results["seed"] == 0
    assert set(results["zeroshot"]["cifar10-test-1k"]) >= {"top1", "top5", "mean_per_class_recall"}
    assert results["retrieval"]["flickr8k-1k"]["num_captions"] == 100
    assert results["linear_probe"]["cifar10-test-1k"]["num_test"] == 15
    assert results["localisation"]["scenes"]["num_scenes"] == 10
    markdown = (tmp_path / "a" / "eval.md").read_text()
    for title in ("Zero-shot classification", "Image-text retrieval", "Linear probe", "localisation"):
        assert title in markdown and title in printed
    assert "| I→T R@1 |" in markdown


def test_eval_clip_checkpoint(tiny_clip_checkpoint: Path, cifar_dir: Path, flickr_dir: Path,
                              tmp_path: Path) -> None:
    argv = [str(tiny_clip_checkpoint), "--zeroshot", str(cifar_dir), "--max-per-class", "3",
            "--retrieval", str(flickr_dir / "captions.csv"), "--max-images", "15", "--no-progress",
            "--out", str(tmp_path)]
    assert _run(argv) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["loss_kind"] == "clip"
    assert 0.0 <= results["retrieval"]["flickr8k-1k"]["t2i_r10"] <= 100.0


def test_eval_without_a_task_is_a_usage_error(tiny_checkpoint: Path, capsys) -> None:
    assert _run([str(tiny_checkpoint)]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_markdown_table_layout() -> None:
    results = {"checkpoint": "/x/step_00000100.pt", "loss_kind": "filip",
               "retrieval": {"flickr": {"i2t_r1": 12.5, "t2i_r1": 10.0, "num_images": 40}}}
    lines = format_markdown(results).splitlines()
    assert lines[0] == "### Image-text retrieval (%)"
    assert lines[2] == "| model | dataset | images | I→T R@1 | T→I R@1 |"
    assert lines[4] == "| step_00000100.pt (filip) | flickr | 40 | 12.50 | 10.00 |"
