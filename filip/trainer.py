"""`filip train CONFIG`: pre-train FILIP (or the CLIP baseline) over WebDataset shards.

One process, or many under torchrun (`torchrun --nproc-per-node 8 -m filip.trainer CONFIG`).
Checkpoints are written atomically every `run.checkpoint_every` steps and hold everything a
resumed run needs to continue bit-for-bit: model, optimizer, scheduler, RNG states and each
rank's data position.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from filip.checkpoint import (capture_rng_state, check_optimizer_state, checkpoint_name, checkpoint_part,
                              latest_checkpoint, list_checkpoints, load_for_resume, restore_rng_state,
                              restore_scaler_state, save_checkpoint)
from filip.config import TrainConfig, load_config, save_config
from filip.distributed import DistributedContext, all_gather_objects, barrier, init_distributed, shutdown
from filip.model import FilipModel, ModelConfig
from filip.tokenizer import DEFAULT_NAME, FilipTokenizer
from pipeline.config_yaml import add_set_option, parse_set_options

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


MAX_LOGIT_SCALE = math.log(100)


def clamp_logit_scale(model: FilipModel) -> None:
    """Keep the temperature parameter in [0, ln 100] (a scale of 1 to 100), as open_clip does.

    The parameter is clamped, not the model's output: an output clamp zeroes the gradient past
    the cap, and momentum could then carry the parameter beyond it for good.
    """
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def build_loss(cfg: TrainConfig, ctx: DistributedContext) -> nn.Module:
    from filip.loss import ClipLoss, FilipLoss

    if cfg.loss.kind == "clip":
        return ClipLoss(rank=ctx.rank, world_size=ctx.world_size)
    return FilipLoss(rank=ctx.rank, world_size=ctx.world_size, chunk_size=cfg.loss.chunk_size,
                     token_keep_ratio=cfg.loss.token_keep_ratio, image_keep_ratio=cfg.loss.image_keep_ratio,
                     text_keep_ratio=cfg.loss.text_keep_ratio, select_group_size=cfg.loss.select_group_size,
                     gather_dtype=DTYPES[cfg.loss.gather_dtype])


# The model outputs a loss reads that hold one row per sample: cached and stitched by micro-batch.
FEATURE_KEYS = ("image_tokens", "text_tokens", "text_mask", "image_pooled", "text_pooled")


def accumulated_backward(network: nn.Module, loss_fn: nn.Module,
                         batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], accum_steps: int = 1,
                         autocast: Callable[[], Any] = contextlib.nullcontext,
                         scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate `loss_fn` over the whole batch (images, ids, mask), running `network` on
    `accum_steps` micro-batches at a time; returns the loss and the logit scale, detached.

    A contrastive loss needs every sample's features, so micro-batch losses cannot be averaged.
    As open_clip's accum_freq: a pass without gradient caches each micro-batch's features; then
    each micro-batch is run again with gradient, its slice of the cache is replaced by the fresh
    features and the whole-batch loss (token selection included) is backpropagated. The gradients
    add up to those of one pass over the batch. The temperature, shared by all micro-batches,
    takes its gradient in the last one only (each pass would add it again). Both passes must agree,
    so the model has no dropout; augmentation happened in the loader. Gradients are added to
    `.grad`: zero them first. `scaler` (fp16) scales each backward.
    """
    images, ids, mask = batch
    if accum_steps == 1:
        with autocast():
            out = network(images, ids, mask)
            loss = loss_fn(**out)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach(), out["logit_scale"].detach()
    if images.shape[0] % accum_steps:
        raise ValueError(f"accum_steps {accum_steps} does not divide the batch of {images.shape[0]}")
    micro = list(zip(*(t.chunk(accum_steps) for t in batch)))
    with torch.no_grad(), autocast():
        cached = [{k: v for k, v in network(*m).items() if k in FEATURE_KEYS} for m in micro]
    no_sync = getattr(network, "no_sync", None)  # DDP: all-reduce the gradients once, at the end
    for j, m in enumerate(micro):
        is_last = j == accum_steps - 1
        with (no_sync() if no_sync is not None and not is_last else contextlib.nullcontext()):
            with autocast():
                out = network(*m)
                features = {k: torch.cat([c[k] for c in cached[:j]] + [out[k]]
                                         + [c[k] for c in cached[j + 1:]]) for k in FEATURE_KEYS}
                logit_scale = out["logit_scale"] if is_last else out["logit_scale"].detach()
                loss = loss_fn(**features, logit_scale=logit_scale)
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach(), logit_scale.detach()


@dataclass
class DataPosition:
    """How far this rank has read: epoch, and per logical worker its stream state (filip.data).

    A worker's state names where its reading continues and which samples its shuffle buffer
    holds, so resuming costs the same at any step (older checkpoints held a sample count instead).
    """

    epoch: int = 0
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_worker: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_worker": self.next_worker,
                "workers": {str(k): v for k, v in self.workers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPosition":
        return cls(int(d["epoch"]), {int(k): dict(v) for k, v in d["workers"].items()}, int(d["next_worker"]))

    @staticmethod
    def unusable(d: dict[str, Any], layout: dict[str, Any]) -> str | None:
        """Why the saved position `d` cannot continue a stream of `layout`; None when it can."""
        states = list(d["workers"].values())
        if any(not isinstance(s, dict) or "layout" not in s for s in states):
            return "it is of an older format"
        if any(s["layout"] != layout for s in states):
            return "the shards, data.num_workers, data.shuffle_buffer or data.resampled changed"
        return None


def resolve_tokenizer_path(cfg: TrainConfig, shards: list[str]) -> Path | str:
    """data.tokenizer, or tokenizer.model beside the first shard (a path, or a URL for shards
    in a bucket)."""
    from filip.data import is_object_url, shard_sibling

    path = cfg.data.tokenizer or shard_sibling(shards[0], DEFAULT_NAME)
    if is_object_url(path):
        import fsspec

        fs, found = fsspec.core.url_to_fs(path)
        if not fs.exists(found):
            raise FileNotFoundError(f"tokenizer {path} not found beside the shards (`filip build` writes "
                                    "it; or set data.tokenizer)")
        return path
    path = Path(path)
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
        tokenizer = FilipTokenizer.load(self.tokenizer_path)
        self.model_cfg: ModelConfig = cfg.model_config(tokenizer.vocab_size)
        # Captions are cut and padded to the model's context, the length of its positional table.
        self.tokenizer = tokenizer.with_context_length(self.model_cfg.context_length)
        # Same seed on every rank: identical initial weights (DDP broadcasts them anyway).
        torch.manual_seed(cfg.run.seed)
        self.model = FilipModel(self.model_cfg).to(ctx.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.run.max_steps,
                                                cfg.optim.min_lr_ratio))
        self.loss_fn = build_loss(cfg, ctx)
        precision = cfg.run.precision
        if precision == "auto":
            precision = "bf16" if ctx.device.type == "cuda" else "fp32"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # float16 gradients underflow: fp16 scales the loss up and the gradients back down.
        self.scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
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
                optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
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
        with checkpoint_part(path, "GradScaler state"):
            restore_scaler_state(self.scaler, state.get("scaler"), path)
        self.step = int(state["step"])
        with checkpoint_part(path, "data position"):
            from filip.data import stream_layout

            d, ranks = self.cfg.data, state["data_state"].get("ranks", [])
            layout = stream_layout(self.shards, d.num_workers, d.shuffle_buffer, d.resampled, self.ctx.world_size)
            why = ("the world size changed" if state["data_state"].get("world_size") != self.ctx.world_size
                   else DataPosition.unusable(ranks[self.ctx.rank], layout))
            if why is None:
                self.position = DataPosition.from_dict(ranks[self.ctx.rank])
            else:
                # The saved stream cannot be continued: restart it at the next epoch (a new shard order).
                epoch = int(ranks[0]["epoch"]) + 1 if ranks else 0
                logger.warning("data position of %s not resumed (%s): the stream restarts at epoch %d",
                               path, why, epoch)
                self.position = DataPosition(epoch=epoch)
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
        self.position.workers[batch["worker"]] = batch["resume_state"]
        self.position.next_worker = (batch["worker"] + 1) % workers

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.ctx.device
        images = batch["images"].to(dev, non_blocking=True)
        ids = batch["ids"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True)
        autocast = (functools.partial(torch.autocast, dev.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logit_scale = accumulated_backward(self.network, self.loss_fn, (images, ids, mask),
                                                 self.cfg.optim.accum_steps, autocast, self.scaler)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped if a gradient overflowed (the scale then drops)
            self.scaler.update()
        else:
            self.optimizer.step()
        clamp_logit_scale(self.model)  # the bare module: self.network may be DDP or compiled
        self.scheduler.step()
        return loss, logit_scale

    def fit(self, stop_after: int | None = None, report_to: str = "none") -> dict[str, Any]:
        from filip.train_reporting import MetricsLog, TrainingEvaluator

        cfg, ctx = self.cfg, self.ctx
        metrics = MetricsLog(self.out_dir, report_to, self.step) if ctx.is_main else None
        evaluator = TrainingEvaluator(cfg.eval, cfg.run.max_steps) if cfg.eval.every_steps else None
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
                if self.scaler is not None:  # fp16: a scale that keeps falling means overflows
                    last["loss_scale"] = self.scaler.get_scale()
                if metrics is not None:  # rank 0
                    metrics.write(last)
                    if bar is not None:
                        bar.set_postfix(loss=last["loss"], scale=last["logit_scale"])
                    logger.info("step %d loss %.4f scale %.2f lr %.3g %.1f samples/s",
                                self.step, last["loss"], last["logit_scale"], last["lr"],
                                last["samples_per_s"])
                window_start, window_samples, window_steps = time.perf_counter(), 0, 0
                window_loss.zero_()
            if evaluator is not None and evaluator.due(self.step):
                # Rank 0 evaluates before the checkpoint, so a resume keeps this record; the
                # other ranks wait at the barrier (no collective runs meanwhile).
                if metrics is not None:
                    metrics.write(evaluator.run(self.model, self.tokenizer, cfg.loss.kind,
                                                self.model_cfg.image_size, self.step, ctx.device))
                barrier(ctx)
            done = self.step == cfg.run.max_steps or self.step == stop_after
            if self.step % cfg.run.checkpoint_every == 0 or done:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                break
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        return last


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None,
          report_to: str = "none") -> dict[str, Any]:
    """Run training in this process (joining torchrun's group if there is one)."""
    from filip.train_reporting import check_reporting

    check_reporting(cfg, report_to)
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
        return trainer.fit(stop_after, report_to)
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
    add_set_option(parser)  # the same option as `filip build`'s
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and exit after this step, as if the job were killed")
    parser.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                        help="also write the metrics as TensorBoard scalars under "
                             "run.output_dir/tensorboard/ (needs the [train] extra)")


def cli_main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, parse_set_options(args.set))
    train(cfg, resume=args.resume, stop_after=args.stop_after, report_to=args.report_to)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="filip train", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
