"""The run configuration: one typed section per stage plus run-level settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from filters.backtranslation import BackTranslationConfig
from filters.caption import CaptionFilterConfig
from filters.dedup import DedupConfig
from filters.resolution import ResolutionFilterConfig
from filters.unsafe import UnsafeFilterConfig
from pipeline.configtools import ConfigError, dump_yaml, from_mapping, load_yaml
from pipeline.stage import Resources

INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl")


@dataclass
class RunConfig:
    """Where the input and output are, how big a shard is, which Ray to use."""

    input: str
    output: str
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str = "caption"
    shard_size: int = 10000  # rows per download shard (img2dataset's number_sample_per_shard)
    ray_address: str | None = None
    seed: int = 0

    REPLACED_KEYS: ClassVar[dict[str, str]] = {
        "allow_private_networks": "open only the networks you need with download.allow_networks, "
                                  "e.g. [127.0.0.1/32]; the guard now runs at connect time"}

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError("run.shard_size must be at least 1")


@dataclass
class DownloadConfig:
    """img2dataset's settings (same names and meanings as its CLI)."""

    image_size: int = 256
    # keep_ratio: the shorter side becomes image_size (never upscaled below), so a 224 crop for
    # training always has real pixels; original_width/original_height record the source size.
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    thread_count: int = 64
    timeout: float = 10.0            # seconds one connect or one read may wait
    deadline: float = 30.0           # seconds one download may take in all: hops, headers, body
    max_body_bytes: int = 8 * 1024 * 1024  # refused (too_large) while streaming, never after
    max_pixels: int = 40_000_000     # width x height read from the header, before decoding
    max_redirects: int = 10
    retries: int = 0                 # for transient failures only: timeouts, connection errors, 429, 5xx
    max_retry_wait: float = 10.0     # longest Retry-After honoured; a longer one ends the download
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

        parse_networks(self.allow_networks)
        for name, addresses in self.hosts.items():
            parse_networks(addresses, key=f"download.hosts.{name}")
        positive = {"thread_count": self.thread_count, "timeout": self.timeout, "deadline": self.deadline,
                    "max_body_bytes": self.max_body_bytes, "max_pixels": self.max_pixels,
                    "image_size": self.image_size}
        for key, value in positive.items():
            if not value > 0 or value != value or value == float("inf"):
                raise ValueError(f"download.{key} must be a positive finite number, got {value!r}")
        if self.retries < 0 or self.max_redirects < 0 or not 0 <= self.max_retry_wait < float("inf"):
            raise ValueError("download.retries, max_redirects and max_retry_wait must be 0 or more")


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
    single_machine_max_rows: int = 10_000_000
    # Search the multi-index tables in waves of this many per Ray shuffle (None: all at once). The
    # shuffle holds rows x tables records of ~150 bytes; see docs/SCALING.md for sizing.
    tables_per_shuffle: int | None = None
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.tables_per_shuffle is not None and self.tables_per_shuffle < 1:
            raise ValueError("dedup.tables_per_shuffle must be at least 1 (or null for all at once)")
        if self.single_machine_max_rows < 0:
            raise ValueError("dedup.single_machine_max_rows must be 0 or more")


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

    samples_per_shard: int = 10000
    seed: int = 0  # the deterministic shuffle of samples across shards
    dropped_samples_per_reason: int = 4  # thumbnails kept per reason and shard for the report
    # Train the trainer's SentencePiece BPE caption tokenizer on the kept captions (and their
    # back-translations) into shards/tokenizer.model; 0 leaves it to `python -m filip.tokenizer`.
    tokenizer_vocab_size: int = 0
    tokenizer_max_sentences: int = 2_000_000  # read from the first shards (already shuffled)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("shards.samples_per_shard must be at least 1")
        if self.tokenizer_vocab_size < 0 or self.tokenizer_max_sentences < 1:
            raise ValueError("shards.tokenizer_vocab_size must be >= 0 and tokenizer_max_sentences >= 1")


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
