import dataclasses
import math
import time
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest

from pipeline.config import (ConfigError, DownloadConfig, PipelineConfig, RunConfig, config_from_dict,
                             load_config)
from pipeline.configtools import Range, field_range, short_repr
from tests.yaml_bombs import alias_bomb

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN = "run: {input: a.csv, output: out}\n"


@pytest.mark.parametrize("name", ["demo.yaml", "cluster-example.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert isinstance(config, PipelineConfig)
    assert config.run.shard_size > 0


def test_cluster_example_is_cluster_shaped() -> None:
    config = load_config(CONFIGS / "cluster-example.yaml")
    assert config.run.output.startswith("s3://")
    assert config.download.allow_networks == []  # public addresses only
    assert config.run.ray_address == "auto"
    # Its ~147M rows are past the in-driver search, so the distributed search runs.
    assert config.dedup.single_machine_max_rows < 147_000_000


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv, output: out}\ndownload: {timeoutt: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key download\.timeoutt"):
        load_config(path)


def test_unknown_key_suggests_the_closest_known_one(tmp_path: Path) -> None:
    known = ", ".join(sorted(field.name for field in dataclasses.fields(DownloadConfig)))
    assert _error(tmp_path, RUN + "download: {timeoutt: 3}\n") == (
        f"unknown key download.timeoutt, did you mean download.timeout? (known keys here: {known})")
    assert _error(tmp_path, RUN + "download: {speed: 3}\n") == f"unknown key download.speed (known keys here: {known})"


def test_a_replaced_key_says_what_to_write_instead(tmp_path: Path) -> None:
    message = _error(tmp_path, "run: {input: a.csv, output: out, allow_private_networks: true}\n")
    assert message == f"run.allow_private_networks was replaced: {RunConfig.REPLACED_KEYS['allow_private_networks']}"
    assert "download.allow_networks" in message


def test_the_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert _error(tmp_path, "- run\n- download\n") == "the top level: expected a mapping, got list ['run', 'download']"
    assert _error(tmp_path, "") == "missing required key run"  # an empty file is an empty mapping


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv, output: out, shard_size: many}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: run\.shard_size: expected an integer, got str 'many'$"):
        load_config(path)


def test_missing_required_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: missing required key run\.output"):
        load_config(path)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply(tmp_path: Path) -> None:
    path = _write(tmp_path, RUN)
    config = load_config(path, {"run.output": "elsewhere", "download.timeout": 3})
    assert config.run.output == "elsewhere"
    assert config.download.timeout == 3.0


def test_override_below_a_value_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, RUN + "download: {timeout: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: download\.timeout: expected a mapping to set "
                                          r"download\.timeout\.x in, got int 3$"):
        load_config(path, {"download.timeout.x": 1})


# Every case of issue 12's list, with the exact message after "<file>: ".
OBSERVED = [
    ("unsafe: {threshold: -1}", "unsafe.threshold: -1.0 is out of range [0, 1]"),
    ("unsafe: {threshold: 7.5}", "unsafe.threshold: 7.5 is out of range [0, 1]"),
    ("dedup: {hamming_threshold: 999}", "dedup.hamming_threshold: 999 is out of range [0, 63]"),
    ("download: {timeout: -1}", "download.timeout: -1.0 is out of range (0, inf)"),
    ("download: {thread_count: 0}", "download.thread_count: 0 is out of range [1, inf)"),
    ("download: {retries: -2}", "download.retries: -2 is out of range [0, inf)"),
    ("download: {encode_quality: 500}", "download.encode_quality: 500 is out of range [0, 100]"),
    ("inspect: {resolution: {max_aspect_ratio: 0}}",
     "inspect.resolution.max_aspect_ratio: 0.0 is out of range [1, inf)"),
    ("inspect: {caption: {max_chars: 0}}", "inspect.caption.max_chars: 0 is out of range [1, inf)"),
    ("unsafe: {threshold: .nan}", "unsafe.threshold: nan is out of range [0, 1]"),
    ("download: {deadline: .inf}", "download.deadline: inf is out of range (0, inf)"),
    ("download: {max_retry_wait: -.inf}", "download.max_retry_wait: -inf is out of range [0, inf)"),
    ("download: {resources: {num_gpus: .nan}}", "download.resources.num_gpus: nan is out of range [0, inf)"),
    # Checks across fields, named by the field they are about.
    ("download: {encode_format: png, encode_quality: 50}",
     "download.encode_quality: 50 is out of range [0, 9] (with encode_format png it is a compression level)"),
    ("shards: {tokenizer_vocab_size: 100}",
     "shards.tokenizer_vocab_size: 100 is out of range: 0 (no tokenizer) or [256, inf)"),
    ("dedup: {resources: {num_cpus: 0}}",
     "dedup.resources.num_cpus: resources need num_cpus > 0 or num_gpus > 0"),
    ("unsafe: {resources: {num_gpus: 0.00001}}",
     "unsafe.resources.num_gpus: 1e-05 is out of range: 0 or [0.0001, inf)"),
    # Choices.
    ("download: {resize_mode: stretch}",
     "download.resize_mode: expected one of ['no', 'keep_ratio', 'keep_ratio_largest', 'center_crop', "
     "'border'], got 'stretch'"),
    ("backtranslation: {dtype: float8}",
     "backtranslation.dtype: expected one of ['auto', 'float32', 'float16', 'bfloat16'], got 'float8'"),
    ("unsafe: {classes: [FEET_EXPOSED, TOES]}", None),  # the 18 classes: checked below by prefix
]


@pytest.mark.parametrize("section, expected", OBSERVED, ids=[case[0] for case in OBSERVED])
def test_observed_bad_values_name_file_key_value_and_range(tmp_path: Path, section: str,
                                                           expected: str | None) -> None:
    message = _error(tmp_path, RUN + section + "\n")
    if expected is None:
        assert message.startswith("unsafe.classes[1]: expected one of ['FEMALE_GENITALIA_COVERED', ")
        assert message.endswith("'BUTTOCKS_COVERED'], got 'TOES'")
    else:
        assert message == expected


def _numeric_fields(cls: type, prefix: str) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every number field under dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, key)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if typing.get_origin(tp) is list:
            args = list(typing.get_args(tp))
        if any(a in (int, float) for a in args):
            yield key, field, args[0]


PIPELINE_NUMBERS = list(_numeric_fields(PipelineConfig, ""))


def test_every_number_has_a_documented_range() -> None:
    # 57 for the default stages; caption_language adds 5 and filip_score 7 (each with its resources)
    assert len(PIPELINE_NUMBERS) == 69
    unranged = [key for key, field, _ in PIPELINE_NUMBERS if field_range(field) is None]
    assert unranged == []


def _outside(spec: Range, tp: type) -> list[Any]:
    """Values just outside each finite end of `spec`, plus NaN and infinity for floats."""
    values: list[Any] = []
    if math.isfinite(spec.low):
        values.append(spec.low - 1 if spec.low_closed else spec.low)
    if math.isfinite(spec.high):
        values.append(spec.high + 1 if spec.high_closed else spec.high)
    if tp is int:
        return [int(v) for v in values]
    return [float(v) for v in values] + [math.nan, math.inf]


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"run": {"input": "a.csv", "output": "out"}}
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


@pytest.mark.parametrize("key, field, tp", PIPELINE_NUMBERS, ids=[case[0] for case in PIPELINE_NUMBERS])
def test_every_range_is_checked_at_load(key: str, field: dataclasses.Field, tp: type) -> None:
    spec = field_range(field)
    assert spec is not None
    for value in _outside(spec, tp):
        with pytest.raises(ConfigError) as caught:
            config_from_dict(_nest(key, value), "x.yaml")
        assert str(caught.value) == f"x.yaml: {key}: {short_repr(value)} is out of range {spec.text}"


def _literal_fields(cls: type, prefix: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(tp):
            yield from _literal_fields(tp, key)
        elif typing.get_origin(tp) is typing.Literal:
            yield key, typing.get_args(tp)


PIPELINE_CHOICES = list(_literal_fields(PipelineConfig, ""))


@pytest.mark.parametrize("key, choices", PIPELINE_CHOICES, ids=[case[0] for case in PIPELINE_CHOICES])
def test_every_choice_is_checked_at_load(key: str, choices: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_nest(key, "nope"), "x.yaml")
    assert str(caught.value) == f"x.yaml: {key}: expected one of {list(choices)}, got 'nope'"


def test_choice_fields_are_the_enumerated_keys() -> None:
    assert [key for key, _ in PIPELINE_CHOICES] == [
        "run.input_format", "download.resize_mode", "download.encode_format", "backtranslation.device",
        "backtranslation.dtype", "backtranslation.engine", "backtranslation.compute_type",
        "backtranslation.fast_attention", "caption_language.accuracy", "filip_score.device"]


def test_range_ends_are_allowed(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, RUN + "unsafe: {threshold: 1}\ndedup: {hamming_threshold: 63}\n"
                                               "download: {retries: 0, encode_format: png, encode_quality: 9}\n"
                                               "shards: {tokenizer_vocab_size: 256}\n"))
    assert (config.unsafe.threshold, config.dedup.hamming_threshold, config.download.retries) == (1.0, 63, 0)
    assert (config.download.encode_quality, config.shards.tokenizer_vocab_size) == (9, 256)


@pytest.mark.parametrize("text, expected", [
    (RUN + "download:\n  timeout: 3\n  retries: 1\n  timeout: 4\n",
     "duplicate key download.timeout (lines 3 and 5)"),
    (RUN + RUN, "duplicate key run (lines 1 and 2)"),
    (RUN + "download:\n  resources: {num_cpus: 1, batch_size: 8, num_cpus: 2}\n",
     "duplicate key download.resources.num_cpus (lines 3 and 3)"),
    (RUN + "download: {hosts: {example.org: [1.2.3.4], example.org: [5.6.7.8]}}\n",
     "duplicate key download.hosts.example.org (lines 2 and 2)"),
    (RUN + "backtranslation:\n  models:\n    en_de: a\n    'en_de': b\n",
     "duplicate key backtranslation.models.en_de (lines 4 and 5)"),
], ids=["section", "top level", "nested", "mapping value", "quoted"])
def test_duplicate_keys_are_refused_at_any_depth(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text) == expected


def test_python_tags_stay_refused(tmp_path: Path) -> None:
    message = _error(tmp_path, "run: !!python/object/apply:os.system ['echo owned']\n")
    assert message == ("not valid YAML: line 1, column 6: could not determine a constructor for the tag "
                       "'tag:yaml.org,2002:python/object/apply:os.system'")


def test_merge_keys_work_and_are_bounded(tmp_path: Path) -> None:
    text = (RUN + "inspect:\n  resources: &shared {num_cpus: 2, batch_size: 64}\n"
            "dedup:\n  resources: {<<: *shared, batch_size: 32}\n")
    config = load_config(_write(tmp_path, text))
    assert (config.dedup.resources.num_cpus, config.dedup.resources.batch_size) == (2.0, 32)
    levels = ["x0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}"]
    levels += [f"x{k}: &m{k} {{<<: [{', '.join([f'*m{k - 1}'] * 9)}]}}" for k in range(1, 9)]
    assert _error(tmp_path, "\n".join(levels) + "\n") == "x4: merge keys (<<) expand to more than 10000 entries"


@pytest.mark.parametrize("section, expected", [
    ("unsafe: {threshold: BOMB}", "unsafe.threshold: expected a number, got list [[[...], [...], [...], "),
    ("download: {allow_networks: BOMB}", "download.allow_networks[0]: expected a string, got list [[[...], "),
    ("download: {hosts: {a: BOMB}}", "download.hosts.a[0]: expected a string, got list [[[...], "),
    ("download: {resize_mode: BOMB}", "download.resize_mode: expected one of ['no', 'keep_ratio', "),
    ("inspect: BOMB", "inspect: expected a mapping, got list [[[...], "),
    ("unsafe: {classes: BOMB}", "unsafe.classes[0]: expected one of ['FEMALE_GENITALIA_COVERED', "),
])
def test_alias_bomb_fails_fast_with_a_short_message(tmp_path: Path, section: str, expected: str) -> None:
    text = RUN + section.replace("BOMB", alias_bomb()) + "\n"
    assert len(text) < 600
    started = time.monotonic()
    message = _error(tmp_path, text)
    assert time.monotonic() - started < 2
    assert message.startswith(expected)
    assert len(message) < 600


def test_long_values_and_keys_are_shortened(tmp_path: Path) -> None:
    # Past float's range: an infinity, refused by the range.
    assert _error(tmp_path, RUN + f"download: {{timeout: {'9' * 4000}}}\n") == (
        "download.timeout: inf is out of range (0, inf)")
    message = _error(tmp_path, RUN + f"dedup: {{hamming_threshold: {'9' * 4000}}}\n")
    assert message == f"dedup.hamming_threshold: {'9' * 18}...{'9' * 19} is out of range [0, 63]"
    message = _error(tmp_path, RUN + f"download: {{allow_networks: [{'x' * 100_000}]}}\n")
    assert message.startswith("download.allow_networks: 'xxxx") and len(message) < 400
    message = _error(tmp_path, RUN + f"download:\n  ? {'k' * 100_000}\n  : 1\n")  # an explicit key
    assert message.startswith(f"unknown key download.{'k' * 57}... (known keys here: allow_networks,")


def test_unreadable_yaml_is_one_line(tmp_path: Path) -> None:
    assert _error(tmp_path, "run: {input: a\n") == ("not valid YAML: line 2, column 1: while parsing a flow "
                                                    "mapping did not find expected ',' or '}'")
    assert _error(tmp_path, "run: " + "[" * 5000 + "]" * 5000 + "\n").startswith("not valid YAML: line 1")
    assert _error(tmp_path, f"run: {{input: a, output: b, shard_size: {'9' * 5000}}}\n") == (
        "not a usable config: Exceeds the limit (4300 digits) for integer string conversion: "
        "value has 5000 digits")
