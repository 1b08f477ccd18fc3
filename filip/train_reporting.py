"""What `filip train` reports as it runs: the metrics log, TensorBoard, evaluation during training.

Rank 0 appends every record to `metrics.jsonl` in `run.output_dir`, one JSON object a line, each with
its `step`. Training records hold the loss, temperature, learning rate and throughput; evaluation
records hold `filip eval`'s results under the key `eval` (`{"step": 500, "eval": {"zeroshot": {...}}}`).
With `--report-to tensorboard` the same numbers are also written as TensorBoard scalars under
`run.output_dir/tensorboard/` (`train/loss`, `eval/zeroshot/<dataset>/top1`, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from filip.config import EvalConfig, TrainConfig
from pipeline.errors import UserError

logger = logging.getLogger("filip.trainer")
METRICS_FILE = "metrics.jsonl"


class ReportingError(UserError):
    """Reporting asked for that cannot work: TensorBoard not installed, an evaluation dataset missing."""


def check_reporting(cfg: TrainConfig, report_to: str) -> None:
    """Fails before training starts, on every rank alike, rather than at the first report."""
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ReportingError("--report-to tensorboard: the tensorboard package is not installed "
                                 "(pip install 'tensorboard>=2.14', or the project's [train] extra)"
                                 ) from None
    if cfg.eval.every_steps is not None:
        for key, path in (("eval.zeroshot", cfg.eval.zeroshot), ("eval.retrieval", cfg.eval.retrieval)):
            if path is not None and not Path(path).exists():
                raise ReportingError(f"{key}: {path} not found")


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """TensorBoard tags and values of a record: `train/<key>`, and nested results by their path.

    Counts of the evaluation sets (num_images, num_classes, ...) are not curves and are left out.
    """
    def walk(node: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}/{key}")
            elif _is_number(value) and not key.startswith("num_"):
                yield f"{prefix}/{key}", float(value)

    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from walk(value, key)
        elif _is_number(value):
            yield f"train/{key}", float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLog:
    """Appends records to the metrics log and, with TensorBoard on, writes their numbers as scalars.

    Made on rank 0 only, after any resume: a resumed run trains the steps after its checkpoint again,
    so TensorBoard is told to purge their old events, as the trainer drops their old log lines.
    """

    def __init__(self, out_dir: Path, report_to: str = "none", step: int = 0) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.writer = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"),
                                        purge_step=step + 1 if step else None)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in scalars(record):
                self.writer.add_scalar(tag, value, record["step"])
            # Records come every log_every steps: flushing each keeps a killed run's curves whole.
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TrainingEvaluator:
    """Runs `filip eval`'s zero-shot and retrieval code on the in-memory model every `eval.every_steps`.

    The global RNG states are restored afterwards, so a run with evaluations trains the same model as
    one without (and a resumed run matches an uninterrupted one).
    """

    def __init__(self, cfg: EvalConfig, max_steps: int) -> None:
        self.cfg, self.max_steps = cfg, max_steps

    def due(self, step: int) -> bool:
        every = self.cfg.every_steps
        return every is not None and (step % every == 0 or step == self.max_steps)

    def arguments(self, device: torch.device) -> argparse.Namespace:
        """`filip eval`'s arguments, defaults included, for this section's datasets."""
        from filip.evaluate import add_cli_arguments

        parser = argparse.ArgumentParser()
        add_cli_arguments(parser)
        args = parser.parse_args(["<training>", "--no-progress", "--batch-size", str(self.cfg.batch_size)])
        args.zeroshot = [Path(self.cfg.zeroshot)] if self.cfg.zeroshot else []
        args.retrieval = [Path(self.cfg.retrieval)] if self.cfg.retrieval else []
        args.max_per_class, args.max_images = self.cfg.max_per_class, self.cfg.max_images
        args.device = str(device)
        return args

    def run(self, model: nn.Module, tokenizer: Any, loss_kind: str, image_size: int, step: int,
            device: torch.device) -> dict[str, Any]:
        """The evaluation record of `step`; the model is left in training mode."""
        from filip.checkpoint import InferenceBundle, capture_rng_state, restore_rng_state
        from filip.data import eval_transform
        from filip.evaluate import evaluate_checkpoint

        started = time.perf_counter()
        bundle = InferenceBundle(model=model, tokenizer=tokenizer, loss_kind=loss_kind,
                                 image_transform=eval_transform(image_size), step=step)
        rng = capture_rng_state()
        model.eval()
        try:
            with torch.no_grad():
                results = evaluate_checkpoint(bundle, self.arguments(device))
        finally:
            model.train()
            restore_rng_state(rng)
        tasks = {task: results[task] for task in ("zeroshot", "retrieval") if task in results}
        tasks["seconds"] = round(time.perf_counter() - started, 2)
        logger.info("step %d eval: %s", step, json.dumps(tasks))
        return {"step": step, "eval": tasks}
