"""The trainer's config loader: types, ranges, choices, duplicate keys and bounded messages."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from filip.config import ConfigError, TrainConfig, config_from_dict, load_config
from filip.model import ModelConfig
from pipeline.configtools import Range, field_range, short_repr
from pipeline.errors import UserError
from tests.yaml_bombs import alias_bomb

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MINIMAL: dict[str, Any] = {"model": {"preset": "tiny"}, "data": {"shards": "s", "batch_size": 8},
                           "optim": {"lr": 0.01}, "run": {"output_dir": "o", "max_steps": 10}}


@pytest.mark.parametrize("name", ["train-base.yaml", "train-tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert isinstance(config, TrainConfig)
    assert config.model_config().image_size in (64, 224)


def _with(dotted: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def _message(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, "x.yaml")
    assert isinstance(caught.value, UserError)
    return str(caught.value)


def _numbers(cls: type, prefix: str) -> Iterator[tuple[str, dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp, key = hints[field.name], f"{prefix}.{field.name}"
        if dataclasses.is_dataclass(tp):
            yield from _numbers(tp, key)
            continue
        args = list(typing.get_args(tp)) if typing.get_origin(tp) is list else (
            [a for a in typing.get_args(tp) if a is not type(None)] or [tp])
        if args[0] in (int, float):
            yield key, field, args[0]


NUMBERS = [number for section in ("data", "loss", "optim", "run", "eval")
           for number in _numbers(typing.get_type_hints(TrainConfig)[section], section)]
MODEL_NUMBERS = list(_numbers(ModelConfig, "model"))


def test_every_number_has_a_documented_range() -> None:
    assert [key for key, _, _ in NUMBERS] == [
        "data.batch_size", "data.num_workers", "data.shuffle_buffer", "data.crop_scale_min",
        "loss.chunk_size", "loss.token_keep_ratio", "loss.image_keep_ratio", "loss.text_keep_ratio",
        "loss.select_group_size", "optim.lr", "optim.weight_decay", "optim.betas",
        "optim.eps", "optim.warmup_steps", "optim.min_lr_ratio", "optim.grad_clip",
        "optim.accum_steps", "run.max_steps", "run.seed", "run.log_every", "run.checkpoint_every",
        "run.keep_checkpoints", "run.cpu_threads", "eval.every_steps", "eval.max_per_class",
        "eval.max_images", "eval.batch_size"]
    assert len(MODEL_NUMBERS) == 13
    assert [key for key, field, _ in NUMBERS + MODEL_NUMBERS if field_range(field) is None] == []


def _outside(spec: Range, tp: type) -> list[Any]:
    values: list[Any] = []
    if math.isfinite(spec.low):
        values.append(spec.low - 1 if spec.low_closed else spec.low)
    if math.isfinite(spec.high):
        values.append(spec.high + 1 if spec.high_closed else spec.high)
    if tp is int:
        return [int(v) for v in values]
    return [float(v) for v in values] + [math.nan, math.inf]


@pytest.mark.parametrize("key, field, tp", NUMBERS + MODEL_NUMBERS,
                         ids=[case[0] for case in NUMBERS + MODEL_NUMBERS])
def test_every_range_is_checked_at_load(key: str, field: dataclasses.Field, tp: type) -> None:
    spec = field_range(field)
    assert spec is not None
    for value in _outside(spec, tp):
        # optim.betas is a list: its items are checked, and the message names the item.
        given, shown = ([value, 0.9], f"{key}[0]") if key == "optim.betas" else (value, key)
        assert _message(_with(key, given)) == f"x.yaml: {shown}: {short_repr(value)} is out of range {spec.text}"


@pytest.mark.parametrize("key, choices", [
    ("loss.kind", ["filip", "clip"]), ("loss.gather_dtype", ["bfloat16", "float16", "float32"]),
    ("optim.name", ["lamb", "adamw"]), ("run.device", ["auto", "cpu", "cuda"]),
    ("run.precision", ["auto", "bf16", "fp16", "fp32"]),
])
def test_every_choice_is_checked_at_load(key: str, choices: list[str]) -> None:
    assert _message(_with(key, "nope")) == f"x.yaml: {key}: expected one of {choices}, got 'nope'"


@pytest.mark.parametrize("key, value, expected", [
    ("optim.lr", 0, "optim.lr: 0.0 is out of range (0, inf)"),
    ("data.batch_size", 0, "data.batch_size: 0 is out of range [1, inf)"),
    ("run.max_steps", -5, "run.max_steps: -5 is out of range [1, inf)"),
    ("loss.token_keep_ratio", 1.5, "loss.token_keep_ratio: 1.5 is out of range (0, 1]"),
    ("optim.betas", [0.9, 1.0], "optim.betas[1]: 1.0 is out of range [0, 1)"),
    ("optim.betas", [0.9], "optim.betas: expected two numbers, got 1"),
    ("optim.grad_clip", float("nan"), "optim.grad_clip: nan is out of range (0, inf)"),
    ("run.max_steps", "ten", "run.max_steps: expected an integer, got str 'ten'"),
    ("model.mlp_ratio", -1, "model.mlp_ratio: -1.0 is out of range (0, 64]"),
    ("model.patch_size", 15, "model.patch_size: 15 does not divide model.image_size 64"),
    ("model.text_heads", 3, "model.text_heads: 3 does not divide model.text_width 64"),
    ("model.preset", "huge", "model.preset: expected one of ['tiny', 'base', 'base16', 'large'], got 'huge'"),
    ("model.vision_width", "wide", "model.vision_width: expected an integer, got str 'wide'"),
    ("model.depth", 3, "unknown key model.depth (known keys here: context_length, count_special_tokens, "),
    ("model.vision_layer", 3, "unknown key model.vision_layer, did you mean model.vision_layers? (known keys "),
    ("model.preset", None, "model.preset: expected one of ['tiny', 'base', 'base16', 'large'], got None"),
])
def test_bad_values_name_file_key_value_and_range(key: str, value: Any, expected: str) -> None:
    assert _message(_with(key, value)).startswith(f"x.yaml: {expected}")


def test_a_model_field_left_out_or_null_keeps_the_presets_value() -> None:
    config = config_from_dict(_with("model.vision_layers", None))
    assert config.model == {"preset": "tiny"}
    assert config.model_config().vision_layers == ModelConfig.preset("tiny").vision_layers == 2
    assert config_from_dict(_with("model.vision_layers", 1)).model == {"preset": "tiny", "vision_layers": 1}


def test_every_preset_name_is_one_model_config_knows() -> None:
    from filip.config import MODEL_PRESETS

    assert [ModelConfig.preset(name).image_size for name in MODEL_PRESETS] == [64, 224, 224, 224]


def test_range_ends_are_allowed() -> None:
    data = _with("loss.token_keep_ratio", 1)
    data["optim"].update(betas=[0, 0.999], min_lr_ratio=1)
    data["model"].update(init_logit_scale=0, mlp_ratio=64)
    config = config_from_dict(data)
    assert (config.loss.token_keep_ratio, config.optim.betas, config.optim.min_lr_ratio) == (1.0, [0.0, 0.999], 1.0)
    assert config.model_config().mlp_ratio == 64.0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


TINY = yaml.safe_dump(MINIMAL, sort_keys=False)


@pytest.mark.parametrize("text, expected", [
    (TINY + "run: {output_dir: o, max_steps: 1}\n", "duplicate key run (lines 8 and 11)"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key optim.lr (lines 2 and 3)"),
    ("model: {preset: tiny, vision_layers: 1, vision_layers: 2}\n", "duplicate key model.vision_layers (lines 1 and 1)"),
], ids=["top level", "section", "model section"])
def test_duplicate_keys_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {expected}"


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found$"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: line 1, column 8: could not determine "
                                          r"a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'$"):
        load_config(_write(tmp_path, "model: !!python/name:os.system ''\n"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: the top level: expected a mapping, got list \['a'\]$"):
        load_config(_write(tmp_path, "- a\n"))


def test_overrides_apply_and_are_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, TINY)
    assert load_config(path, {"run.max_steps": 3}).run.max_steps == 3
    with pytest.raises(ConfigError, match=r"bad\.yaml: run\.log_every: 0 is out of range \[1, inf\)$"):
        load_config(path, {"run.log_every": 0})
    with pytest.raises(ConfigError, match=r"bad\.yaml: run\.max_steps: expected a mapping to set "
                                          r"run\.max_steps\.x in, got int 10$"):
        load_config(path, {"run.max_steps.x": 1})


def _yaml_with(dotted: str, raw: str) -> str:
    """MINIMAL as YAML, with `raw` (YAML text) as the value of `dotted` (section.key)."""
    section, leaf = dotted.split(".")
    data = copy.deepcopy(MINIMAL)
    rest = {key: value for key, value in data.pop(section, {}).items() if key != leaf}
    body = yaml.safe_dump({section: rest}, sort_keys=False) if rest else f"{section}:\n"
    return yaml.safe_dump(data, sort_keys=False) + body + f"  {leaf}: {raw}\n"


@pytest.mark.parametrize("key, expected", [
    ("optim.lr", "optim.lr: expected a number, got list [[[...], [...], [...], [...], ...], "),
    ("data.shards", "data.shards[0]: expected a string, got list [[[...], "),  # the list's item
    ("optim.betas", "optim.betas[0]: expected a number, got list [[[...], "),
    ("model.embed_dim", "model.embed_dim: expected an integer, got list [[[...], "),
    ("loss.kind", "loss.kind: expected one of ['filip', 'clip'], got [[[...], "),
])
def test_alias_bomb_fails_fast_with_a_short_message(tmp_path: Path, key: str, expected: str) -> None:
    path = _write(tmp_path, _yaml_with(key, alias_bomb()))
    assert path.stat().st_size < 700
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert time.monotonic() - started < 2
    assert str(caught.value).startswith(f"{path}: {expected}")
    assert len(str(caught.value)) < 400
