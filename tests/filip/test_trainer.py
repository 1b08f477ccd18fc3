"""The trainer end to end on CPU over real shards: learning, checkpoints, exact resume, config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from filip.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_for_inference
from filip.config import ConfigError
from filip.loss import late_interaction_scores
from filip.trainer import lr_factor, main


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_loss_falls_over_100_steps(tiny_training_run: Path) -> None:
    metrics = read_metrics(tiny_training_run)
    assert [m["step"] for m in metrics] == list(range(10, 101, 10))
    assert {"loss", "logit_scale", "lr", "samples_per_s", "samples_per_s_per_gpu"} <= set(metrics[0])
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert last < first - 0.5, (first, last)
    resolved = yaml.safe_load((tiny_training_run / "config.resolved.yaml").read_text())
    assert resolved["data"]["tokenizer"].endswith("tokenizer.model")
    assert [p.name for p in list_checkpoints(tiny_training_run)] == ["step_00000050.pt", "step_00000100.pt"]


def test_resume_after_kill_matches_uninterrupted_run(tiny_training_run: Path, tmp_path: Path) -> None:
    # A run killed after step 50 leaves exactly the step-50 checkpoint behind.
    killed = tmp_path / "run"
    killed.mkdir()
    shutil.copy(tiny_training_run / "step_00000050.pt", killed)
    # ... and metric lines up to step 70, the last one cut short by the kill.
    logged = (tiny_training_run / "metrics.jsonl").read_text().splitlines()
    upto_70 = [line for line in logged if json.loads(line)["step"] <= 70]
    (killed / "metrics.jsonl").write_text("\n".join(upto_70) + "\n" + upto_70[-1][:20])
    cfg = yaml.safe_load((tiny_training_run / "config.resolved.yaml").read_text())
    cfg["run"]["output_dir"] = str(killed)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "train.yaml"), "--resume", "latest"]) == 0
    resumed = load_checkpoint(killed / "step_00000100.pt")
    straight = load_checkpoint(tiny_training_run / "step_00000100.pt")
    assert resumed["step"] == straight["step"] == 100
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for slot, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][slot][key]),
                               torch.as_tensor(value)), (slot, key)
    assert resumed["scheduler"] == straight["scheduler"]
    assert resumed["data_state"] == straight["data_state"]
    # Lines after the checkpoint's step are dropped and logged again: each step once.
    assert [m["step"] for m in read_metrics(killed)] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_resume_from_an_older_data_position_restarts_the_stream(tiny_training_run: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    state = torch.load(tiny_training_run / "step_00000050.pt", weights_only=True)
    for rank in state["data_state"]["ranks"]:  # as checkpoints held it before: (raw position, batches)
        rank["workers"] = {k: [v["position"], v["batch_index"]] for k, v in rank["workers"].items()}
    torch.save(state, run / "step_00000050.pt")
    epoch = state["data_state"]["ranks"][0]["epoch"] + 1
    cfg = yaml.safe_load((tiny_training_run / "config.resolved.yaml").read_text())
    cfg["run"].update(output_dir=str(run), max_steps=52)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level("WARNING", logger="filip.trainer"):
        assert main([str(tmp_path / "train.yaml"), "--resume", "latest"]) == 0
    assert any(f"not resumed (it is of an older format): the stream restarts at epoch {epoch}" in r.getMessage()
               for r in caplog.records)
    ranks = load_checkpoint(run / "step_00000052.pt")["data_state"]["ranks"]
    assert ranks[0]["epoch"] == epoch and ranks[0]["workers"]["0"]["batch_index"] == 2


def test_stop_after_then_resume_latest_continues(flickr_shards: list[str], tmp_path: Path,
                                                 tiny_config_writer) -> None:
    config = str(tiny_config_writer(Path(flickr_shards[0]).parent, tmp_path / "run",
                                    tmp_path / "train.yaml", max_steps=4, batch_size=8, loss="clip"))
    config_args = [config, "--set", "run.log_every=1"]
    assert main([*config_args, "--stop-after", "2"]) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002.pt"
    assert main([*config_args, "--resume", "latest"]) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 4


def test_bad_config_fails_naming_file_and_key(flickr_shards: list[str], tmp_path: Path,
                                              tiny_config_writer) -> None:
    path = tiny_config_writer(Path(flickr_shards[0]).parent, tmp_path / "run", tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key optim\.learning_rate \(known keys here: "):
        main([str(path), "--set", "optim.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"bad\.yaml: run\.max_steps: expected an integer, got str 'ten'$"):
        main([str(path), "--set", "run.max_steps=ten"])


def test_checkpoint_loads_for_inference_and_matches_pairs(tiny_checkpoint: Path,
                                                          flickr_shards: list[str]) -> None:
    import io
    import tarfile

    from PIL import Image

    bundle = load_for_inference(tiny_checkpoint)
    assert bundle.loss_kind == "filip" and not bundle.model.training and bundle.step == 100
    images, captions = [], []
    with tarfile.open(flickr_shards[0]) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            if member.name.endswith(".jpg"):
                images.append(bundle.image_transform(Image.open(io.BytesIO(data))))
            elif member.name.endswith(".txt"):
                captions.append(data.decode())
            if len(captions) == 32 and len(images) == 32:
                break
    with torch.no_grad():
        image = bundle.model.encode_image(torch.stack(images))
        text = bundle.model.encode_text(*bundle.tokenizer(captions))
        i2t, _ = late_interaction_scores(image.tokens, text.tokens, text.mask)
    accuracy = (i2t.argmax(dim=1) == torch.arange(32)).float().mean().item()
    assert accuracy > 3 / 32  # well above chance (1/32) on pairs it trained on


def test_warmup_then_cosine() -> None:
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_torchrun_two_cpu_processes_train_and_checkpoint(flickr_shards, tiny_config_writer, tmp_path) -> None:
    """The README's command: `torchrun --nproc-per-node 2 -m filip.trainer CONFIG` (gloo on CPU)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    config = tiny_config_writer(Path(flickr_shards[0]).parent, out, tmp_path / "train.yaml", max_steps=6)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--standalone", "-m", "filip.trainer",
                             str(config), "--set", "run.log_every=3", "--set", "run.checkpoint_every=6"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "step_00000006.pt")
    assert state["step"] == 6 and state["data_state"]["world_size"] == 2
    assert len(state["data_state"]["ranks"]) == 2
    assert [m["step"] for m in read_metrics(out)] == [3, 6]


def test_logit_scale_past_the_cap_is_clamped_back_and_still_moves(flickr_shards: list[str], tmp_path: Path,
                                                                   tiny_config_writer) -> None:
    """The parameter, not the output, is clamped: at the cap its gradient still brings it down."""
    import math

    from filip.config import load_config
    from filip.distributed import init_distributed
    from filip.trainer import Trainer

    config = tiny_config_writer(Path(flickr_shards[0]).parent, tmp_path / "run", tmp_path / "train.yaml",
                                max_steps=4, batch_size=8)
    trainer = Trainer(load_config(config, {"run.device": "cpu"}), init_distributed("cpu"))
    # A loss that only pushes the temperature down, so each step's direction is known.
    trainer.loss_fn = lambda **out: out["logit_scale"]
    cap = torch.tensor(math.log(100)).item()  # ln 100 in the parameter's float32
    with torch.no_grad():
        trainer.model.logit_scale.fill_(cap + 1)  # where momentum could carry it
    batches = trainer.batches()
    trainer.train_step(next(batches))
    assert trainer.model.logit_scale.item() == cap  # one small step down, then clamped to the cap
    trainer.train_step(next(batches))
    # An output clamp would have given a zero gradient from cap + 1 on: the scale would stay there.
    assert trainer.model.logit_scale.grad.item() > 0  # d exp(x)/dx at the cap (then grad-clipped)
    assert 0 < trainer.model.logit_scale.item() < cap


def test_context_length_reaches_data_checkpoint_and_inference(flickr_shards: list[str], flickr_dir: Path,
                                                              tmp_path: Path, tiny_config_writer,
                                                              capsys) -> None:
    """`model.context_length: 32` trains, and its checkpoint retrieves (`filip eval`) and aligns at 32."""
    import argparse

    from filip import align, evaluate

    config = tiny_config_writer(Path(flickr_shards[0]).parent, tmp_path / "run", tmp_path / "train.yaml",
                                max_steps=3, batch_size=8)
    assert main([str(config), "--set", "model.context_length=32", "--set", "run.log_every=1"]) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    path = latest_checkpoint(tmp_path / "run")
    state = load_checkpoint(path)
    assert state["context_length"] == 32 and state["model_config"]["context_length"] == 32
    bundle = load_for_inference(path)
    ids, mask = bundle.tokenizer(["a dog runs " * 40])
    assert ids.shape == mask.shape == (1, 32) and mask.all()

    parser = argparse.ArgumentParser()
    evaluate.add_cli_arguments(parser)
    assert evaluate.cli_main(parser.parse_args([
        str(path), "--retrieval", str(flickr_dir / "captions.csv"), "--max-images", "10", "--device", "cpu",
        "--no-progress", "--out", str(tmp_path / "eval")])) == 0
    retrieval = json.loads((tmp_path / "eval" / "eval.json").read_text())["retrieval"]["flickr8k-1k"]
    assert retrieval["num_captions"] == 50
    parser = argparse.ArgumentParser()
    align.add_cli_arguments(parser)
    image = sorted((flickr_dir / "images").iterdir())[0]
    assert align.cli_main(parser.parse_args([str(path), str(image), "a dog runs " * 40,
                                             "--out", str(tmp_path / "align.png"),
                                             "--json", str(tmp_path / "align.json")])) == 0
    tokens = json.loads((tmp_path / "align.json").read_text())["tokens"]
    assert len(tokens) == 30  # 32 ids less start and end, which do not take part
    capsys.readouterr()
