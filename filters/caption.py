"""Caption checks (empty, length, non-text, file names and URLs, blocklisted words) and normalisation."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from filters.base import (CAPTION_BLOCKLISTED, CAPTION_EMPTY, CAPTION_FILENAME_OR_URL,
                          CAPTION_NOT_TEXT, CAPTION_TOO_LONG, CAPTION_TOO_SHORT)
from pipeline.configtools import ranged

# A short default; deployments pass their own list through the config.
DEFAULT_BLOCKLIST = ["porn", "porno", "xxx", "nsfw", "nude", "nudes", "naked", "sex", "hentai", "milf"]

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
# Camera and upload names: IMG_1234, DSC0001, DSCN1234, P1010001, PXL_20230101_..., Screenshot_...
_CAMERA_NAME = re.compile(
    r"^(img|dsc|dscn|dscf|pict|pic|photo|image|screenshot|pxl|mvimg|gopr|dji|p\d|sam|wp|vid)"
    r"[\s_\-]*\d[\w\-]*$", re.IGNORECASE)
_FILE_NAME = re.compile(r"^[\w\-. ]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic|svg)$", re.IGNORECASE)
_URL = re.compile(r"^((https?|ftp)://|www\.)\S+$|^[\w\-]+(\.[\w\-]+)+/\S*$", re.IGNORECASE)
_DIGITS_AND_SEPARATORS = re.compile(r"^[\d\W_]+$")


def normalize_caption(text: str | None) -> str:
    """Lowercase, collapse whitespace, strip punctuation at both ends: equal captions compare equal."""
    if not text:
        return ""
    collapsed = _WHITESPACE.sub(" ", text.lower()).strip()
    return collapsed.strip(" \t.,;:!?'\"`()[]{}<>-_*#~|/\\").strip()


@dataclass
class CaptionFilterConfig:
    """Caption limits; ``min_alpha_ratio`` is the share of letters among non-space characters."""

    min_words: int = ranged(2, "[0, inf)")
    max_chars: int = ranged(1000, "[1, inf)")
    min_alpha_ratio: float = ranged(0.5, "[0, 1]")
    blocklist: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKLIST))


class CaptionFilter:
    """Keep decision for one caption; the first failing check names the reason."""

    def __init__(self, config: CaptionFilterConfig | None = None) -> None:
        self.config = config or CaptionFilterConfig()
        words = sorted({word.lower() for word in self.config.blocklist if word.strip()})
        # Whole words only: 'sex' must not drop 'Sussex' or 'sextant'.
        self._blocked = (re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
                         if words else None)

    def reason(self, caption: str | None) -> str | None:
        text = _WHITESPACE.sub(" ", caption or "").strip()
        if not text:
            return CAPTION_EMPTY
        if len(text) > self.config.max_chars:
            return CAPTION_TOO_LONG
        # File names and URLs are checked before length: 'IMG_1234.jpg' is one word but says more.
        if _FILE_NAME.match(text) or _URL.match(text) or _CAMERA_NAME.match(text):
            return CAPTION_FILENAME_OR_URL
        visible = text.replace(" ", "")
        letters = sum(character.isalpha() for character in visible)
        if letters / len(visible) < self.config.min_alpha_ratio or _DIGITS_AND_SEPARATORS.match(text):
            return CAPTION_NOT_TEXT
        if len(_WORD.findall(text)) < self.config.min_words:
            return CAPTION_TOO_SHORT
        if self._blocked is not None and self._blocked.search(text):
            return CAPTION_BLOCKLISTED
        return None
