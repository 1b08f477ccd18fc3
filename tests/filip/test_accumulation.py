"""Gradient accumulation with cached features (trainer.accumulated_backward) and fp16 training."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from filip.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from filip.config import ConfigError, config_from_dict
from filip.loss import ClipLoss, FilipLoss
from filip.model import FilipModel, ModelConfig
from filip.trainer import accumulated_backward

BATCH = 8
CONTEXT = 16


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, 64, 64, generator=gen, dtype=torch.float64)
    lengths = torch.randint(3, CONTEXT + 1, (BATCH,), generator=gen)
    ids = torch.randint(4, 1000, (BATCH, CONTEXT), generator=gen)
    mask = torch.arange(CONTEXT)[None] < lengths[:, None]
    return images, ids.masked_fill(~mask, 0), mask


def _gradients(model: FilipModel, loss_fn: torch.nn.Module, accum_steps: int
               ) -> tuple[float, float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, scale = accumulated_backward(model, loss_fn, _batch(), accum_steps)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), scale.item(), grads


@pytest.mark.parametrize("accum_steps", [2, 4])
@pytest.mark.parametrize("loss_fn", [
    FilipLoss(token_keep_ratio=0.5, gather_dtype=None, chunk_size=3),
    ClipLoss(),
], ids=["filip-selecting-half", "clip"])
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(loss_fn: torch.nn.Module,
                                                                  accum_steps: int) -> None:
    torch.manual_seed(0)
    model = FilipModel(ModelConfig.preset("tiny", context_length=CONTEXT)).double().train()
    whole_loss, whole_scale, whole = _gradients(model, loss_fn, 1)
    loss, scale, accumulated = _gradients(model, loss_fn, accum_steps)
    assert abs(loss - whole_loss) < 1e-10 and scale == whole_scale
    # Every parameter has a gradient, the temperature's counted once (not once per micro-batch).
    assert sorted(accumulated) == sorted(whole) == sorted(n for n, _ in model.named_parameters())
    assert whole["logit_scale"].abs().item() > 1e-3
    worst = max((accumulated[n] - whole[n]).abs().max().item() for n in whole)
    assert worst < 1e-10, worst


def test_a_batch_the_micro_batches_do_not_divide_is_refused() -> None:
    model = FilipModel(ModelConfig.preset("tiny", context_length=CONTEXT)).double()
    with pytest.raises(ValueError, match="accum_steps 3 does not divide the batch of 8"):
        accumulated_backward(model, ClipLoss(), _batch(), 3)


MINIMAL = {"model": {"preset": "tiny"}, "data": {"shards": "s", "batch_size": 8},
           "optim": {"lr": 0.01}, "run": {"output_dir": "o", "max_steps": 10}}


def test_accum_steps_must_divide_the_batch_size_at_load() -> None:
    data = copy.deepcopy(MINIMAL)
    data["optim"]["accum_steps"] = 4
    assert config_from_dict(data, "x.yaml").optim.accum_steps == 4
    data["optim"]["accum_steps"] = 3
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, "x.yaml")
    assert str(caught.value) == "x.yaml: optim.accum_steps: 3 does not divide data.batch_size 8"


def _cpu_fp16_reason() -> str | None:
    """Why fp16 autocast with a GradScaler cannot run on this CPU torch build (None: it can)."""
    try:
        layer = torch.nn.Linear(4, 4)
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(torch.ones(2, 4))
        if out.dtype != torch.float16:
            return f"CPU autocast gives {out.dtype}, not float16"
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(out.float().sum()).backward()
    except (RuntimeError, TypeError, ValueError) as error:
        return f"no fp16 autocast or GradScaler on CPU here ({type(error).__name__}: {error})"
    return None


def test_fp16_with_accumulation_trains_scales_and_resumes_its_scaler(
        flickr_shards: list[str], tmp_path: Path, tiny_config_writer) -> None:
    reason = _cpu_fp16_reason()
    if reason:
        pytest.skip(reason)
    from filip.config import load_config
    from filip.distributed import init_distributed
    from filip.trainer import Trainer, main

    out = tmp_path / "run"
    config = tiny_config_writer(Path(flickr_shards[0]).parent, out, tmp_path / "train.yaml",
                                max_steps=3, batch_size=8)
    overrides = ["run.precision=fp16", "optim.accum_steps=2", "run.log_every=1", "run.device=cpu"]
    assert main([str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert math.isfinite(m["loss"]) and 0 < m["loss_scale"] <= 65536.0
    state = load_checkpoint(latest_checkpoint(out))
    assert state["scaler"]["scale"] == metrics[-1]["loss_scale"]

    # Resume restores the scale; a corrupt one is refused, naming the checkpoint.
    path = latest_checkpoint(out)
    state["scaler"]["scale"] = 1024.0
    torch.save(state, path)
    cfg = load_config(config, {"run.precision": "fp16", "run.device": "cpu"})
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.resume(str(path))
    assert trainer.scaler is not None and trainer.scaler.get_scale() == 1024.0
    state["scaler"]["scale"] = float("nan")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="GradScaler scale nan is not a finite positive number"):
        Trainer(cfg, init_distributed("cpu")).resume(str(path))


def _ddp_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = FilipModel(ModelConfig.preset("tiny", context_length=CONTEXT)).double().train()
        network = DistributedDataParallel(model)
        worst = {}
        for name, loss_fn in [("filip", FilipLoss(rank, 2, token_keep_ratio=0.5, gather_dtype=None)),
                              ("clip", ClipLoss(rank, 2))]:
            grads = []
            for accum_steps in (1, 2):
                model.zero_grad(set_to_none=True)
                accumulated_backward(network, loss_fn, _batch(seed=rank), accum_steps)
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            worst[name] = max((grads[1][n] - grads[0][n]).abs().max().item() for n in grads[0])
        if rank == 0:
            Path(result_file).write_text(json.dumps(worst))
    finally:
        dist.destroy_process_group()


def test_micro_batches_under_ddp_give_the_gradients_of_one_batch(tmp_path: Path) -> None:
    """Two gloo processes: gathered features, DDP's no_sync and its final all-reduce agree."""
    import torch.multiprocessing as mp

    result = tmp_path / "worst.json"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(result)), nprocs=2)
    worst = json.loads(result.read_text())
    assert set(worst) == {"filip", "clip"} and max(worst.values()) < 1e-10, worst
