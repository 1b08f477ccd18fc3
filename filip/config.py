"""Typed training configuration read from YAML by the pipeline's loader (pipeline/configtools.py
and pipeline/config_yaml.py): the same checks, the same `--set` overrides and the same one-line
messages as `filip build`, naming the file and the dotted key.

Ranges are declared on the fields with `ranged(default, "[low, high]")` and choices as `Literal`
types. Checks across fields raise `FieldError` from `__post_init__`, named by the key they are about.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Literal

from filip.model import ModelConfig
from pipeline.config_yaml import load_yaml
from pipeline.configtools import SEED_RANGE, ConfigError, FieldError, build, from_mapping, ranged

# ConfigError is the one loader's error type, re-exported for the trainer's callers.
__all__ = ["ConfigError", "DataConfig", "EvalConfig", "LossConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "config_from_dict", "load_config", "save_config"]
# The names ModelConfig.preset knows (filip/model.py); a choice, checked like every other one.
MODEL_PRESETS = ("tiny", "base", "base16", "large")


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed and augmented."""

    shards: str | list[str]  # folder, glob, brace pattern or list of .tar files
    batch_size: int = ranged(MISSING, "[1, inf)")  # per process
    tokenizer: str | None = None  # default: tokenizer.model beside the first shard
    num_workers: int = ranged(4, "[0, inf)")
    shuffle_buffer: int = ranged(1000, "[0, inf)")  # 0 or 1: no shuffle
    resampled: bool = False
    crop_scale_min: float = ranged(0.5, "(0, 1]")  # smallest share of the image a random crop keeps
    auto_augment: bool = True


@dataclass
class LossConfig:
    """FILIP late interaction ('filip') or the CLIP baseline over pooled features ('clip')."""

    kind: Literal["filip", "clip"] = "filip"
    chunk_size: int | None = ranged(None, "[1, inf)")
    # FILIP's token selection, on one process or many (the same rule): the share of image patches
    # and of the padded text width kept, by score; 1.0 turns it off.
    token_keep_ratio: float = ranged(0.25, "(0, 1]")
    image_keep_ratio: float | None = ranged(None, "(0, 1]")  # None: token_keep_ratio
    text_keep_ratio: float | None = ranged(None, "(0, 1]")  # None: token_keep_ratio
    select_group_size: int | None = ranged(None, "[1, inf)")  # samples a token is scored against; None: the per-process batch
    # The dtype of the late interaction (run outside autocast): float16 as in the paper; measured
    # in bench/loss_precision.py: 0.7% gradient error against bfloat16's 15% (docs/BENCHMARKS.md).
    gather_dtype: Literal["bfloat16", "float16", "float32"] = "float16"


@dataclass
class OptimConfig:
    """Optimizer ('lamb' from timm or 'adamw') with linear warmup then cosine decay."""

    lr: float = ranged(MISSING, "(0, inf)")
    name: Literal["lamb", "adamw"] = "lamb"
    weight_decay: float = ranged(0.05, "[0, inf)")
    betas: list[float] = ranged(spec="[0, 1)", default_factory=lambda: [0.9, 0.98])  # exactly two
    eps: float = ranged(1e-6, "(0, inf)")
    warmup_steps: int = ranged(0, "[0, inf)")
    min_lr_ratio: float = ranged(0.0, "[0, 1]")  # the cosine's floor, as a share of lr
    grad_clip: float | None = ranged(1.0, "(0, inf)")  # None: no clipping
    # Gradient accumulation: data.batch_size (the batch the loss contrasts) is run through the
    # model as this many micro-batches, with cached features (trainer.accumulated_backward); it
    # must divide data.batch_size. The result is that of one step over the whole batch.
    accum_steps: int = ranged(1, "[1, inf)")

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise FieldError("betas", f"expected two numbers, got {len(self.betas)}")


@dataclass
class RunConfig:
    """Length of the run, outputs, logging and checkpoint cadence."""

    output_dir: str
    max_steps: int = ranged(MISSING, "[1, inf)")
    seed: int = ranged(0, SEED_RANGE)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on GPU, fp32 on CPU; fp16: float16 autocast with a GradScaler (older GPUs)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    log_every: int = ranged(10, "[1, inf)")
    checkpoint_every: int = ranged(1000, "[1, inf)")
    keep_checkpoints: int = ranged(3, "[1, inf)")
    progress_bar: bool = True
    compile: bool = False
    # torch's intra-op threads on CPU (None: torch's default). One thread is far faster when
    # the cores are shared with other busy processes.
    cpu_threads: int | None = ranged(None, "[1, inf)")


@dataclass
class EvalConfig:
    """Evaluation during training: rank 0 runs `filip eval`'s zero-shot and retrieval code on the model."""

    every_steps: int | None = ranged(None, "[1, inf)")  # None: no evaluation during training
    zeroshot: str | None = None  # an ImageFolder dataset, as `filip eval --zeroshot` takes
    retrieval: str | None = None  # an image,caption CSV (images/ beside it), as `filip eval --retrieval`
    # Bounds on the cost of each evaluation (None: the whole dataset), as --max-per-class / --max-images.
    max_per_class: int | None = ranged(None, "[1, inf)")
    max_images: int | None = ranged(None, "[1, inf)")
    batch_size: int = ranged(64, "[1, inf)")

    def __post_init__(self) -> None:
        if self.every_steps is not None and not (self.zeroshot or self.retrieval):
            raise FieldError("every_steps", "set, but there is nothing to evaluate: give eval.zeroshot or "
                                            "eval.retrieval")


def _model_section() -> type:
    """`model:` as a dataclass: a preset plus any ModelConfig field, typed and ranged as there;
    a field left out (or null) keeps the preset's value."""
    hints = typing.get_type_hints(ModelConfig)
    return make_dataclass("ModelSection", [("preset", Literal[MODEL_PRESETS])] + [
        (f.name, hints[f.name] | None, field(default=None, metadata=f.metadata)) for f in fields(ModelConfig)])


ModelSection = _model_section()


@dataclass
class TrainConfig:
    """The whole `filip train` config: one section per concern."""

    model: dict[str, Any]  # 'preset' plus any ModelConfig field to override
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.model = {k: v for k, v in asdict(build(ModelSection, self.model, "model")).items() if v is not None}
        cfg = self.model_config()
        # timm builds these only when they divide; the model would fail after the data is set up.
        if cfg.image_size % cfg.patch_size:
            raise FieldError("model.patch_size", f"{cfg.patch_size} does not divide model.image_size "
                                                 f"{cfg.image_size}")
        for tower in ("vision", "text"):
            width, heads = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
            if width % heads:
                raise FieldError(f"model.{tower}_heads", f"{heads} does not divide model.{tower}_width {width}")
        if self.data.batch_size % self.optim.accum_steps:
            raise FieldError("optim.accum_steps", f"{self.optim.accum_steps} does not divide data.batch_size "
                                                  f"{self.data.batch_size}")

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return ModelConfig.preset(self.model["preset"], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> TrainConfig:
    return from_mapping(TrainConfig, data, source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML train config. `overrides` maps dotted keys ('run.max_steps') to values."""
    return load_yaml(TrainConfig, path, overrides)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (beside the checkpoints)."""
    import os

    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
