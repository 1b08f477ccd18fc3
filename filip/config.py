"""Typed training configuration read from YAML, failing loudly on any missing, unknown or
wrongly typed key (the error names the file and the dotted key)."""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from filip.model import ModelConfig
from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file that does not match the schema."""


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed and augmented."""

    shards: str | list[str]  # folder, glob, brace pattern or list of .tar files
    batch_size: int  # per process
    tokenizer: str | None = None  # default: tokenizer.model beside the first shard
    num_workers: int = 4
    shuffle_buffer: int = 1000
    resampled: bool = False
    crop_scale_min: float = 0.5
    auto_augment: bool = True


@dataclass
class LossConfig:
    """FILIP late interaction ('filip') or the CLIP baseline over pooled features ('clip')."""

    kind: str = "filip"
    chunk_size: int | None = None
    token_keep_ratio: float = 0.25  # only used with several processes; 1.0 turns it off
    gather_dtype: str = "bfloat16"  # 'bfloat16' | 'float16' | 'float32'


@dataclass
class OptimConfig:
    """Optimizer ('lamb' from timm or 'adamw') with linear warmup then cosine decay."""

    lr: float
    name: str = "lamb"
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0


@dataclass
class RunConfig:
    """Length of the run, outputs, logging and checkpoint cadence."""

    output_dir: str
    max_steps: int
    seed: int = 0
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    precision: str = "auto"  # 'auto' (bf16 on GPU, fp32 on CPU) | 'bf16' | 'fp32'
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    progress_bar: bool = True
    compile: bool = False
    # torch's intra-op threads on CPU (None: torch's default). One thread is far faster when
    # the cores are shared with other busy processes.
    cpu_threads: int | None = None


@dataclass
class TrainConfig:
    """The whole `filip train` config: one section per concern."""

    model: dict[str, Any]  # 'preset' plus any ModelConfig field to override
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    loss: LossConfig = field(default_factory=LossConfig)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return ModelConfig.preset(self.model["preset"], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "loss.kind": ("filip", "clip"),
    "loss.gather_dtype": ("bfloat16", "float16", "float32"),
    "optim.name": ("lamb", "adamw"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.precision": ("auto", "bf16", "fp32"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return `value` if it matches annotation `tp` (ints pass as floats), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
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
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{source}: unknown key {key!r} (allowed: {sorted(names)})")
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                raise ConfigError(f"{source}: missing required key {key!r}")
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            values[f.name] = _build(tp, data[f.name], key, source)
        else:
            try:
                values[f.name] = _check(data[f.name], tp, key)
            except ConfigError as error:
                raise ConfigError(f"{source}: {error}") from None
            if key in CHOICES and values[f.name] not in CHOICES[key]:
                raise ConfigError(f"{source}: {key}: {values[f.name]!r} is not one of {CHOICES[key]}")
    return cls(**values)


def _check_model_section(section: dict[str, Any], source: str) -> None:
    if "preset" not in section:
        raise ConfigError(f"{source}: missing required key 'model.preset'")
    hints = typing.get_type_hints(ModelConfig)
    for key, value in section.items():
        if key == "preset":
            _check(value, str, "model.preset")
            continue
        if key not in hints:
            raise ConfigError(f"{source}: unknown key 'model.{key}' (allowed: preset, {sorted(hints)})")
        try:
            section[key] = _check(value, hints[key], f"model.{key}")
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    try:
        ModelConfig.preset(section["preset"])
    except ValueError as error:
        raise ConfigError(f"{source}: model.preset: {error}") from None


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    cfg: TrainConfig = _build(TrainConfig, data, "", source)
    _check_model_section(cfg.model, source)
    if cfg.data.batch_size < 1 or cfg.run.max_steps < 1:
        raise ConfigError(f"{source}: data.batch_size and run.max_steps must be >= 1")
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML train config. `overrides` maps dotted keys ('run.max_steps') to values."""
    import yaml

    path = Path(path)
    with open(path) as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
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
