"""Typed training configuration read from YAML, failing loudly on any missing, unknown, wrongly
typed or out-of-range key, or a key given twice (the error names the file and the dotted key).

Ranges are declared on the fields with `ranged(default, "[low, high]")` and choices as `Literal`
types, the mechanism of the pipeline's loader (pipeline/configtools.py), whose YAML reading and
value checks this loader shares.
"""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from filip.model import ModelConfig
from pipeline import configtools
from pipeline.configtools import (SEED_RANGE, apply_overrides, check_value, clip, describe, field_range,
                                  ranged, read_yaml, short_key, short_repr, to_float)


class ConfigError(configtools.ConfigError):
    """A config file that does not match the schema (a UserError: one line, exit 2)."""


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


@dataclass
class TrainConfig:
    """The whole `filip train` config: one section per concern."""

    model: dict[str, Any]  # 'preset' plus any ModelConfig field to override
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return ModelConfig.preset(self.model["preset"], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return `value` if it matches annotation `tp` (ints pass as floats), else raise.

    A list fails on its first wrong item, so an aliased (YAML bomb) structure is never walked.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, where)
            except configtools.ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {describe(value)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {short_repr(value)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is Any:
        if tp is Any or isinstance(value, dict):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return to_float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {describe(value)}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        key = f"{where}.{short_key(unknown[0])}" if where else short_key(unknown[0])
        raise ConfigError(f"unknown key '{key}' (allowed: {sorted(names)})")
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                raise ConfigError(f"missing required key '{key}'")
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            values[f.name] = _build(tp, data[f.name], key)
        else:
            values[f.name] = _check(data[f.name], tp, key)
            check_value(key, values[f.name], field_range(f))
    return cls(**values)


def _check_model_section(section: dict[str, Any]) -> None:
    """`model:` holds a preset name and ModelConfig fields to override: each typed and ranged."""
    if "preset" not in section:
        raise ConfigError("missing required key 'model.preset'")
    hints = typing.get_type_hints(ModelConfig)
    model_fields = {f.name: f for f in fields(ModelConfig)}
    for key, value in section.items():
        if key == "preset":
            _check(value, str, "model.preset")
            continue
        if key not in hints:
            raise ConfigError(f"unknown key 'model.{short_key(key)}' (allowed: preset, {sorted(hints)})")
        section[key] = _check(value, hints[key], f"model.{key}")
        check_value(f"model.{key}", section[key], field_range(model_fields[key]))
    overrides = {k: v for k, v in section.items() if k != "preset"}
    try:
        cfg = ModelConfig.preset(section["preset"], **overrides)
    except ValueError as error:
        raise ConfigError(f"model.preset: {clip(str(error))}") from None
    # timm builds these only when they divide; the model would fail after the data is set up.
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"model.patch_size: {cfg.patch_size} does not divide model.image_size "
                          f"{cfg.image_size}")
    for tower in ("vision", "text"):
        width, heads = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
        if width % heads:
            raise ConfigError(f"model.{tower}_heads: {heads} does not divide model.{tower}_width {width}")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    try:
        cfg: TrainConfig = _build(TrainConfig, data, "")
        _check_model_section(cfg.model)
        if len(cfg.optim.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {len(cfg.optim.betas)}")
        if cfg.eval.every_steps is not None and not (cfg.eval.zeroshot or cfg.eval.retrieval):
            raise ConfigError("eval.every_steps: set, but there is nothing to evaluate: "
                              "give eval.zeroshot or eval.retrieval")
        if cfg.data.batch_size % cfg.optim.accum_steps:
            raise ConfigError(f"optim.accum_steps: {cfg.optim.accum_steps} does not divide "
                              f"data.batch_size {cfg.data.batch_size}")
    except configtools.ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML train config. `overrides` maps dotted keys ('run.max_steps') to values."""
    try:
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        apply_overrides(data, overrides, str(path))
    except configtools.ConfigError as error:
        raise ConfigError(str(error)) from None
    return config_from_dict(data, str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (beside the checkpoints)."""
    import os

    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
