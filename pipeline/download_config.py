"""The download stage's settings: img2dataset's names, and the bounds of the download guard."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.configtools import FieldError, clip, ranged, short_key
from pipeline.stage import Resources


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
