"""`filip train CONFIG`: pre-train FILIP (or the CLIP baseline) over WebDataset shards.

One process, or many under torchrun (`torchrun --nproc-per-node 8 -m filip.trainer CONFIG`).
Checkpoints are written atomically every `run.checkpoint_every` steps and hold everything a
resumed run needs to continue bit-for-bit: model, optimizer, scheduler, RNG states and each
rank's data position.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from filip.checkpoint import (capture_rng_state, check_optimizer_state, checkpoint_name, checkpoint_part,
                              latest_checkpoint, list_checkpoints, load_for_resume, restore_rng_state,
                              save_checkpoint)
from filip.config import ConfigError, TrainConfig, load_config, save_config
from filip.distributed import DistributedContext, all_gather_objects, barrier, init_distributed, shutdown
from filip.model import FilipModel, ModelConfig
from filip.tokenizer import DEFAULT_NAME, FilipTokenizer

logger = logging.getLogger("filip.trainer")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parameter_groups(model: FilipModel, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices: biases, norms, embeddings and the temperature are exempt."""
    exempt = model.no_weight_decay_names()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: FilipModel) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.optim.weight_decay)
    betas = (cfg.optim.betas[0], cfg.optim.betas[1])
    if cfg.optim.name == "lamb":
        from timm.optim import Lamb

        # Clipping is done once, globally, by the trainer; timm's own pre-clip is turned off.
        return Lamb(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps, max_grad_norm=None)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps, fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_loss(cfg: TrainConfig, ctx: DistributedContext) -> nn.Module:
    from filip.loss import ClipLoss, FilipLoss

    if cfg.loss.kind == "clip":
        return ClipLoss(rank=ctx.rank, world_size=ctx.world_size)
    return FilipLoss(rank=ctx.rank, world_size=ctx.world_size, chunk_size=cfg.loss.chunk_size,
                     token_keep_ratio=cfg.loss.token_keep_ratio, image_keep_ratio=cfg.loss.image_keep_ratio,
                     text_keep_ratio=cfg.loss.text_keep_ratio, select_group_size=cfg.loss.select_group_size,
                     gather_dtype=DTYPES[cfg.loss.gather_dtype])


@dataclass
class DataPosition:
    """How far this rank has read: epoch, and per logical worker (raw position, batches)."""

    epoch: int = 0
    workers: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_worker: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_worker": self.next_worker,
                "workers": {str(k): list(v) for k, v in self.workers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPosition":
        return cls(int(d["epoch"]), {int(k): (int(v[0]), int(v[1])) for k, v in d["workers"].items()},
                   int(d["next_worker"]))


def resolve_tokenizer_path(cfg: TrainConfig, shards: list[str]) -> Path:
    path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(shards[0]).parent / DEFAULT_NAME
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} not found: train one with "
                                f"`python -m filip.tokenizer {Path(shards[0]).parent}`")
    return path


class Trainer:
    """Holds the model, optimizer, data stream and counters of one training process."""

    def __init__(self, cfg: TrainConfig, ctx: DistributedContext) -> None:
        from filip.data import expand_shards

        self.cfg, self.ctx = cfg, ctx
        self.out_dir = Path(cfg.run.output_dir)
        self.shards = expand_shards(cfg.data.shards)
        self.tokenizer_path = resolve_tokenizer_path(cfg, self.shards)
        self.tokenizer = FilipTokenizer.load(self.tokenizer_path)
        self.model_cfg: ModelConfig = cfg.model_config(self.tokenizer.vocab_size)
        # Same seed on every rank: identical initial weights (DDP broadcasts them anyway).
        torch.manual_seed(cfg.run.seed)
        self.model = FilipModel(self.model_cfg).to(ctx.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.run.max_steps,
                                                cfg.optim.min_lr_ratio))
        self.loss_fn = build_loss(cfg, ctx)
        use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and ctx.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.step = 0
        self.position = DataPosition()
        self.network: nn.Module = self.model
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.network = DistributedDataParallel(
                self.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        if cfg.run.compile:
            self.network = torch.compile(self.network)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path | None:
        positions = all_gather_objects(self.position.to_dict(), self.ctx)
        path = None
        if self.ctx.is_main:
            resolved = self.cfg.to_dict()
            resolved["data"]["tokenizer"] = str(self.tokenizer_path)
            path = save_checkpoint(
                self.out_dir / checkpoint_name(self.step), model=self.model, model_config=self.model_cfg,
                tokenizer=self.tokenizer, loss_kind=self.cfg.loss.kind, step=self.step,
                optimizer=self.optimizer, scheduler=self.scheduler, scaler=None,
                data_state={"world_size": self.ctx.world_size, "ranks": positions},
                train_config=resolved, rng_state=capture_rng_state())
            for old in list_checkpoints(self.out_dir)[: -self.cfg.run.keep_checkpoints]:
                old.unlink(missing_ok=True)
        barrier(self.ctx)
        return path

    def resume(self, spec: str) -> None:
        path = latest_checkpoint(self.out_dir) if spec == "latest" else Path(spec)
        if path is None:
            logger.info("--resume latest: no checkpoint in %s, starting fresh", self.out_dir)
            return
        # Checked against this run's model before anything is loaded into it.
        state = load_for_resume(path, self.model, self.model_cfg)
        with checkpoint_part(path, "optimizer state"):
            self.optimizer.load_state_dict(state["optimizer"])
            check_optimizer_state(self.optimizer, path)
        with checkpoint_part(path, "scheduler state"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        with checkpoint_part(path, "data position"):
            ranks = state["data_state"].get("ranks", [])
            if state["data_state"].get("world_size") == self.ctx.world_size:
                self.position = DataPosition.from_dict(ranks[self.ctx.rank])
            else:
                # A different world size reshards the data: restart the stream at the saved epoch.
                logger.warning("world size changed since %s: data position restarts", path)
                self.position = DataPosition(epoch=int(ranks[0]["epoch"]) + 1 if ranks else 0)
        with checkpoint_part(path, "RNG state"):
            restore_rng_state(state["rng"])
        if self.ctx.is_main:
            self._drop_metrics_after(self.step)
            logger.info("resumed from %s at step %d", path, self.step)

    def _drop_metrics_after(self, step: int) -> None:
        """Steps after the checkpoint are trained again: their old metric lines would be duplicates."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) > step:
                    continue
            except (ValueError, AttributeError):
                continue  # a line cut short by the crash
            kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    # -- data ----------------------------------------------------------------------------------
    def batches(self) -> Any:
        """Endless batches; a new epoch (new shard order) starts when the shards run out."""
        from filip.data import ShardDataset, ShardReadError, make_loader, train_transform

        d = self.cfg.data
        transform = train_transform(self.model_cfg.image_size, d.crop_scale_min, d.auto_augment)
        while True:
            dataset = ShardDataset(
                self.shards, self.tokenizer, d.batch_size, transform, seed=self.cfg.run.seed,
                epoch=self.position.epoch, resampled=d.resampled, shuffle_buffer=d.shuffle_buffer,
                rank=self.ctx.rank, world_size=self.ctx.world_size, resume=self.position.workers,
                worker_offset=self.position.next_worker)
            got_any = False
            shards_text = f"data.shards {str(d.shards)[:200]!r}"
            try:
                for batch in make_loader(dataset, d.num_workers):
                    got_any = True
                    yield batch
            except ShardReadError as error:  # a worker gave up on unreadable shards
                raise ShardReadError(f"{shards_text}: {error}") from None
            if not got_any and not self.position.workers:
                raise ShardReadError(
                    f"{shards_text}: rank {self.ctx.rank} read no batch of {d.batch_size} samples "
                    f"from its share of the {len(self.shards)} shards (unreadable, or too few)")
            self.position = DataPosition(epoch=self.position.epoch + 1)

    def record(self, batch: dict[str, Any]) -> None:
        workers = max(1, self.cfg.data.num_workers)
        self.position.workers[batch["worker"]] = (batch["position"], batch["batch_index"] + 1)
        self.position.next_worker = (batch["worker"] + 1) % workers

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.ctx.device
        images = batch["images"].to(dev, non_blocking=True)
        ids = batch["ids"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True)
        autocast = (torch.autocast(dev.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            out = self.network(images, ids, mask)
            loss = self.loss_fn(**out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), out["logit_scale"].detach()

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        metrics_path = self.out_dir / "metrics.jsonl"
        bar = None
        if ctx.is_main and cfg.run.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.run.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict[str, Any] = {}
        batches = self.batches()
        window_start, window_samples, window_steps = time.perf_counter(), 0, 0
        window_loss = torch.zeros((), device=ctx.device)
        while self.step < cfg.run.max_steps:
            batch = next(batches)
            loss, logit_scale = self.train_step(batch)
            self.record(batch)
            self.step += 1
            window_samples += batch["images"].shape[0]
            window_loss += loss.float()  # summed on the device: no sync until we log
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps:
                # .item() syncs with the GPU: only every log_every steps.
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                per_gpu = window_samples / elapsed
                last = {"step": self.step, "loss": round(window_loss.item() / window_steps, 6),
                        "logit_scale": round(logit_scale.item(), 4),
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": round(per_gpu * ctx.world_size, 2),
                        "samples_per_s_per_gpu": round(per_gpu, 2), "epoch": self.position.epoch}
                if ctx.is_main:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(last) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=last["loss"], scale=last["logit_scale"])
                    logger.info("step %d loss %.4f scale %.2f lr %.3g %.1f samples/s",
                                self.step, last["loss"], last["logit_scale"], last["lr"],
                                last["samples_per_s"])
                window_start, window_samples, window_steps = time.perf_counter(), 0, 0
                window_loss.zero_()
            done = self.step == cfg.run.max_steps or self.step == stop_after
            if self.step % cfg.run.checkpoint_every == 0 or done:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                break
        if bar is not None:
            bar.close()
        return last


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Run training in this process (joining torchrun's group if there is one)."""
    ctx = init_distributed(cfg.run.device)
    threads = torch.get_num_threads()
    if cfg.run.cpu_threads is not None:
        torch.set_num_threads(cfg.run.cpu_threads)
    try:
        trainer = Trainer(cfg, ctx)
        if ctx.is_main:
            resolved = cfg.to_dict()
            resolved["data"]["tokenizer"] = str(trainer.tokenizer_path)
            save_config(load_resolved(resolved), trainer.out_dir / "config.resolved.yaml")
        if resume:
            trainer.resume(resume)
        return trainer.fit(stop_after)
    finally:
        torch.set_num_threads(threads)
        shutdown(ctx)


def load_resolved(data: dict[str, Any]) -> TrainConfig:
    from filip.config import config_from_dict

    return config_from_dict(data, "<resolved>")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="train config YAML (see configs/train-*.yaml)")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest checkpoint in run.output_dir) or a checkpoint path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set run.max_steps=100 (YAML value)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and exit after this step, as if the job were killed")


def cli_main(args: argparse.Namespace) -> int:
    import yaml

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not all(part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY (run.max_steps=100), "
                              f"got {item[:80]!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value is not YAML "
                              f"({' '.join(str(err).split())[:120]})") from None
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="filip train", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
