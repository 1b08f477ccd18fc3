"""The run configuration: one typed section per stage plus run-level settings.

Each number's valid range is on its field (`ranged(default, "[low, high]")`, checked at load by
pipeline/configtools.py); each choice is a `Literal`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from filters.backtranslation import BackTranslationConfig
from filters.caption import CaptionFilterConfig
from filters.dedup import DedupConfig
from filters.resolution import ResolutionFilterConfig
from filters.unsafe import UnsafeFilterConfig
from pipeline.configtools import (SEED_RANGE, ConfigError, FieldError, clip, dump_yaml, from_mapping,
                                  load_yaml, ranged, short_key)
from pipeline.stage import Resources

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
class DownloadConfig:
    """img2dataset's settings (same names and meanings as its CLI)."""

    image_size: int = ranged(256, "[1, 65535]")  # 65535: the largest side JPEG can store
    # keep_ratio: the shorter side becomes image_size (never upscaled below), so a 224 crop for
    # training always has real pixels; original_width/original_height record the source size.
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = ranged(95, "[0, 100]")  # jpg/webp quality; with png a compression level 0-9
    thread_count: int = ranged(64, "[1, inf)")
    timeout: float = ranged(10.0, "(0, inf)")      # seconds one connect or one read may wait
    deadline: float = ranged(30.0, "(0, inf)")     # seconds one download may take in all: hops, headers, body
    # refused (too_large) while streaming, never after
    max_body_bytes: int = ranged(8 * 1024 * 1024, "[1, inf)")
    max_pixels: int = ranged(40_000_000, "[1, inf)")  # width x height from the header, before decoding
    max_redirects: int = ranged(10, "[0, inf)")
    # for transient failures only: timeouts, connection errors, 429, 5xx
    retries: int = ranged(0, "[0, inf)")
    # longest Retry-After honoured; a longer one ends the download
    max_retry_wait: float = ranged(10.0, "[0, inf)")
    # The address guard, at connect time on every redirect hop: only public addresses unless a
    # network is listed here (CIDR). Link-local and cloud metadata addresses stay refused unless
    # an entry lies inside them (169.254.169.254/32).
    allow_networks: list[str] = field(default_factory=list)
    # Static host name -> addresses, looked up before DNS (as curl's --resolve); the guard checks
    # them like any resolved address.
    hosts: dict[str, list[str]] = field(default_factory=dict)
    user_agent_token: str | None = "filip-corpus"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        from filters.web.address import parse_networks

        lists = {"allow_networks": self.allow_networks,
                 **{f"hosts.{short_key(name)}": addresses for name, addresses in self.hosts.items()}}
        for key, entries in lists.items():
            try:
                parse_networks(entries, key=key)
            except ValueError as err:  # "KEY: 'entry' is not a network ..."; the loader adds download.
                raise FieldError(key, clip(str(err).partition(": ")[2])) from None
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise FieldError("encode_quality", f"{self.encode_quality} is out of range [0, 9] "
                                               "(with encode_format png it is a compression level)")


@dataclass
class InspectConfig:
    """Decode and hash every image; the resolution/shape and caption filters."""

    resolution: ResolutionFilterConfig = field(default_factory=ResolutionFilterConfig)
    caption: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)
    resources: Resources = field(default_factory=Resources)


@dataclass
class DedupStageConfig(DedupConfig):
    """Global exact (sha256) and near (pHash Hamming distance) deduplication."""

    enabled: bool = True
    # Up to this many rows the search runs in the driver (compiled; ~260 bytes a row at its peak at
    # 10M, besides the row table the driver holds anyway); above it, as a Ray Data shuffle that no
    # single machine has to hold. 0: always the shuffle.
    single_machine_max_rows: int = ranged(10_000_000, "[0, inf)")
    # Search the multi-index tables in waves of this many per Ray shuffle (None: all at once). The
    # shuffle holds rows x tables records of ~150 bytes; see docs/SCALING.md for sizing.
    tables_per_shuffle: int | None = ranged(None, "[1, inf)")
    resources: Resources = field(default_factory=Resources)


@dataclass
class UnsafeStageConfig(UnsafeFilterConfig):
    """The NudeNet unsafe-image filter (onnxruntime on GPU when there is one)."""

    enabled: bool = True
    resources: Resources = field(default_factory=Resources)


@dataclass
class BackTranslationStageConfig(BackTranslationConfig):
    """Caption back-translation through German and Russian (MarianMT)."""

    resources: Resources = field(default_factory=Resources)


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


@dataclass
class PipelineConfig:
    """The whole `filip build` configuration file."""

    run: RunConfig
    download: DownloadConfig = field(default_factory=DownloadConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    dedup: DedupStageConfig = field(default_factory=DedupStageConfig)
    unsafe: UnsafeStageConfig = field(default_factory=UnsafeStageConfig)
    backtranslation: BackTranslationStageConfig = field(default_factory=BackTranslationStageConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    return load_yaml(PipelineConfig, path, overrides)


def config_from_dict(data: Mapping[str, Any], source: str = "<config>") -> PipelineConfig:
    return from_mapping(PipelineConfig, data, source)


__all__ = ["PipelineConfig", "RunConfig", "DownloadConfig", "ConfigError", "load_config",
           "config_from_dict", "dump_yaml"]
