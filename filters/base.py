"""Shared vocabulary of the filters: the reason strings a filter may return.

A filter answers ``reason(...) -> str | None``: ``None`` keeps the row, a string drops it and says why.
The constants live here so stages, statistics and tests spell every reason the same way.
"""
from __future__ import annotations

DECODE_ERROR = "decode_error"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
CAPTION_EMPTY = "caption_empty"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
CAPTION_NOT_TEXT = "caption_not_text"
CAPTION_FILENAME_OR_URL = "caption_filename_or_url"
CAPTION_BLOCKLISTED = "caption_blocklisted"
CAPTION_LANGUAGE = "caption_language"
UNSAFE_IMAGE = "unsafe_image"
LOW_AGREEMENT = "low_image_text_agreement"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
DUPLICATE_CAPTION_AND_IMAGE = "duplicate_caption_and_image"
