"""Training reports: the metrics log, TensorBoard scalars and evaluation during training (tiny CPU runs)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from filip.checkpoint import load_checkpoint
from filip.config import ConfigError
from filip.train_reporting import MetricsLog, ReportingError, scalars
from filip.trainer import main
from pipeline.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def eval_overrides(cifar_dir: Path, flickr_dir: Path, every: int) -> list[str]:
    return ["--set", f"eval.every_steps={every}", "--set", f"eval.zeroshot={cifar_dir}",
            "--set", "eval.max_per_class=1", "--set", f"eval.retrieval={flickr_dir / 'captions.csv'}",
            "--set", "eval.max_images=8", "--set", "eval.batch_size=16"]


@pytest.fixture()
def tiny_config(flickr_shards: list[str], tmp_path: Path, tiny_config_writer) -> list[str]:
    """A 4-step tiny run logging every 2 steps; then `--set` more."""
    config = tiny_config_writer(Path(flickr_shards[0]).parent, tmp_path / "run", tmp_path / "train.yaml",
                                max_steps=4, batch_size=8)
    return [str(config), "--set", "run.log_every=2"]


def test_eval_records_and_tensorboard_scalars(tiny_config: list[str], tmp_path: Path, cifar_dir: Path,
                                              flickr_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main([*tiny_config, *eval_overrides(cifar_dir, flickr_dir, 3), "--report-to", "tensorboard"]) == 0
    records = read_metrics(run)
    # Every 3 steps and at the end, after that step's training record.
    assert [(r["step"], "eval" in r) for r in records] == [(2, False), (3, True), (4, False), (4, True)]
    for record in records[1::2]:
        zeroshot = record["eval"]["zeroshot"]["cifar10-test-1k"]
        retrieval = record["eval"]["retrieval"]["flickr8k-1k"]
        assert (zeroshot["num_images"], zeroshot["num_classes"]) == (10, 10)
        assert 0.0 <= zeroshot["top1"] <= zeroshot["top5"] <= 100.0
        assert (retrieval["num_images"], retrieval["num_captions"]) == (8, 40)
        assert 0.0 <= retrieval["t2i_r1"] <= retrieval["t2i_r10"] <= 100.0
    tb = read_scalars(run / "tensorboard")
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "samples_per_s_per_gpu", "epoch"):
        assert [step for step, _ in tb[f"train/{key}"]] == [2, 4], key
    assert [v for _, v in tb["train/loss"]] == pytest.approx([records[0]["loss"], records[2]["loss"]])
    for tag in ("eval/zeroshot/cifar10-test-1k/top1", "eval/retrieval/flickr8k-1k/i2t_r5", "eval/seconds"):
        assert [step for step, _ in tb[tag]] == [3, 4], tag
    assert tb["eval/zeroshot/cifar10-test-1k/top1"][1][1] == pytest.approx(
        records[3]["eval"]["zeroshot"]["cifar10-test-1k"]["top1"])
    assert not any("num_" in tag for tag in tb)


def test_evaluation_leaves_training_unchanged(tiny_config: list[str], tmp_path: Path, cifar_dir: Path,
                                              flickr_dir: Path) -> None:
    """The model returns to training mode and the RNG states are restored: the same weights result."""
    assert main([*tiny_config, *eval_overrides(cifar_dir, flickr_dir, 1)]) == 0
    assert main([*tiny_config, "--set", f"run.output_dir={tmp_path / 'plain'}"]) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "eval" in r] == [1, 2, 3, 4]
    assert all("eval" not in r for r in read_metrics(tmp_path / "plain"))
    evaluated = load_checkpoint(tmp_path / "run" / "step_00000004.pt")["model"]
    plain = load_checkpoint(tmp_path / "plain" / "step_00000004.pt")["model"]
    for name, tensor in plain.items():
        assert torch.equal(evaluated[name], tensor), name


def test_evaluator_restores_training_mode_and_rng_states(tiny_config: list[str], cifar_dir: Path,
                                                        flickr_dir: Path) -> None:
    import random

    import numpy as np

    from filip.config import EvalConfig, load_config
    from filip.distributed import init_distributed
    from filip.train_reporting import TrainingEvaluator
    from filip.trainer import Trainer

    trainer = Trainer(load_config(tiny_config[0], {"run.device": "cpu"}), init_distributed("cpu"))
    section = EvalConfig(every_steps=5, zeroshot=str(cifar_dir), max_per_class=1,
                         retrieval=str(flickr_dir / "captions.csv"), max_images=4)
    evaluator = TrainingEvaluator(section, max_steps=12)
    assert [step for step in range(1, 13) if evaluator.due(step)] == [5, 10, 12]
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    record = evaluator.run(trainer.model, trainer.tokenizer, "filip", trainer.model_cfg.image_size, 5,
                           torch.device("cpu"))
    assert trainer.model.training
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert record["step"] == 5 and set(record["eval"]) == {"zeroshot", "retrieval", "seconds"}
    assert record["eval"]["retrieval"]["flickr8k-1k"]["num_captions"] == 20


def test_resume_keeps_eval_records_up_to_the_checkpoint(tiny_config: list[str], tmp_path: Path,
                                                        cifar_dir: Path, flickr_dir: Path) -> None:
    args = [*tiny_config, *eval_overrides(cifar_dir, flickr_dir, 2), "--set", "run.checkpoint_every=2"]
    assert main(args) == 0
    (tmp_path / "run" / "step_00000004.pt").unlink()  # as if killed before the step-4 checkpoint
    assert main([*args, "--resume", "latest"]) == 0  # from step 2: the step-4 records are written again
    assert [(r["step"], "eval" in r) for r in read_metrics(tmp_path / "run")] == [
        (2, False), (2, True), (4, False), (4, True)]


def test_tensorboard_purges_the_steps_a_resume_trains_again(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    first = MetricsLog(tmp_path, "tensorboard")
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path, "tensorboard", step=2)  # from the step-2 checkpoint
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_scalar_tags() -> None:
    record = {"step": 5, "eval": {"zeroshot": {"c": {"top1": 50.0, "num_images": 10}}, "seconds": 1.5}}
    assert list(scalars(record)) == [("eval/zeroshot/c/top1", 50.0), ("eval/seconds", 1.5)]
    assert list(scalars({"step": 5, "loss": 2.5, "epoch": 0, "flag": True})) == [
        ("train/loss", 2.5), ("train/epoch", 0.0)]


def test_missing_tensorboard_fails_before_training(tiny_config: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ReportingError, match=r"^--report-to tensorboard: the tensorboard package is not "
                                             r"installed") as caught:
        main([*tiny_config, "--report-to", "tensorboard"])
    assert isinstance(caught.value, UserError)
    assert not (tmp_path / "run").exists()


def test_eval_section_is_checked_before_training(tiny_config: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.yaml: eval\.every_steps: set, but there is nothing "
                                          r"to evaluate: give eval\.zeroshot or eval\.retrieval$"):
        main([*tiny_config, "--set", "eval.every_steps=2"])
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(ReportingError, match=rf"^eval\.retrieval: {missing} not found$"):
        main([*tiny_config, "--set", "eval.every_steps=2", "--set", f"eval.retrieval={missing}"])
    assert not (tmp_path / "run").exists()


def test_two_processes_evaluate_on_rank_zero_without_deadlock(tiny_config: list[str], tmp_path: Path,
                                                             cifar_dir: Path, flickr_dir: Path) -> None:
    """Under torchrun (gloo on CPU) rank 0 evaluates while rank 1 waits at the barrier."""
    import os
    import subprocess

    pytest.importorskip("tensorboard")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--standalone", "-m", "filip.trainer", *tiny_config,
                             *eval_overrides(cifar_dir, flickr_dir, 2), "--report-to", "tensorboard"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(r["step"], "eval" in r) for r in read_metrics(tmp_path / "run")] == [
        (2, False), (2, True), (4, False), (4, True)]
    assert [step for step, _ in read_scalars(tmp_path / "run" / "tensorboard")["eval/seconds"]] == [2, 4]
