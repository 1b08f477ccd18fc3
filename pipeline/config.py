"""The run configuration: run-level settings, the `stages:` order, and one typed section per
registered stage (each stage module declares its own; see pipeline/registry.py).

Each number's valid range is on its field (`ranged(default, "[low, high]")`, checked at load by
pipeline/configtools.py, the trainer's loader too); each choice is a `Literal`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from pipeline.config_yaml import dump_yaml, load_yaml
from pipeline.configtools import SEED_RANGE, ConfigError, FieldError, from_mapping, ranged
from pipeline.download_config import DownloadConfig
from pipeline.registry import check_stage_order, registered_stages

INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl")
MIN_TOKENIZER_VOCAB = 256


@dataclass
class RunConfig:
    """Where the input and output are, how big a shard is, which Ray to use."""

    input: str
    output: str
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str = "caption"
    # rows per download shard (img2dataset's number_sample_per_shard)
    shard_size: int = ranged(10000, "[1, inf)")
    ray_address: str | None = None
    seed: int = ranged(0, SEED_RANGE)

    REPLACED_KEYS: ClassVar[dict[str, str]] = {
        "allow_private_networks": "open only the networks you need with download.allow_networks, "
                                  "e.g. [127.0.0.1/32]; the guard now runs at connect time"}


@dataclass
class ShardsConfig:
    """The final WebDataset shards for training."""

    samples_per_shard: int = ranged(10000, "[1, inf)")
    seed: int = ranged(0, SEED_RANGE)  # the deterministic shuffle of samples across shards
    # thumbnails kept per reason and shard for the report
    dropped_samples_per_reason: int = ranged(4, "[0, inf)")
    # Train the trainer's SentencePiece BPE caption tokenizer on the kept captions (and their
    # back-translations) into shards/tokenizer.model; 0 leaves it to `python -m filip.tokenizer`.
    # 0 or at least 256: SentencePiece needs a piece for every character of the captions, and it
    # would fail only after the whole build.
    tokenizer_vocab_size: int = ranged(0, "[0, inf)")
    # read from the first shards (already shuffled)
    tokenizer_max_sentences: int = ranged(2_000_000, "[1, inf)")

    def __post_init__(self) -> None:
        if 0 < self.tokenizer_vocab_size < MIN_TOKENIZER_VOCAB:
            raise FieldError("tokenizer_vocab_size", f"{self.tokenizer_vocab_size} is out of range: 0 (no "
                                                     f"tokenizer) or [{MIN_TOKENIZER_VOCAB}, inf)")


DEFAULT_STAGES = ("download", "inspect", "dedup", "unsafe", "backtranslate")


def _check_stages(config: Any) -> None:
    problem = check_stage_order(list(config.stages))
    if problem:
        raise FieldError("stages", problem)


def _pipeline_config_class() -> type:
    """The `filip build` config: `run`, the `stages:` order, one section per registered stage (its
    own config class, declared in its module), then `shards`. Built from the registry, so that a
    new stage brings its section with it."""
    specs = sorted(registered_stages().values(),
                   key=lambda s: (DEFAULT_STAGES.index(s.name) if s.name in DEFAULT_STAGES else len(DEFAULT_STAGES),
                                  s.name))
    sections = [(spec.section, spec.config, field(default_factory=spec.config)) for spec in specs]
    cls = make_dataclass(
        "PipelineConfig",
        [("run", RunConfig),
         # the per-shard stages in the order they run; every name is a registered stage
         ("stages", list[str], field(default_factory=lambda: list(DEFAULT_STAGES))),
         *sections,
         ("shards", ShardsConfig, field(default_factory=ShardsConfig))],
        namespace={"__post_init__": _check_stages,
                   "__doc__": "The whole `filip build` configuration file."})
    cls.__module__ = __name__  # pickling and messages name it as if written here
    return cls


PipelineConfig = _pipeline_config_class()


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    return load_yaml(PipelineConfig, path, overrides)


def config_from_dict(data: Mapping[str, Any], source: str = "<config>") -> PipelineConfig:
    return from_mapping(PipelineConfig, data, source)


__all__ = ["PipelineConfig", "RunConfig", "DownloadConfig", "ConfigError", "load_config",
           "config_from_dict", "dump_yaml"]
