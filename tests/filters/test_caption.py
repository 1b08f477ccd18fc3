"""Exact reasons of the caption filter, and caption normalisation."""
from __future__ import annotations

import pytest

from filters.caption import CaptionFilter, CaptionFilterConfig, normalize_caption


@pytest.mark.parametrize(("caption", "reason"), [
    (None, "caption_empty"),
    ("", "caption_empty"),
    ("  \t\n ", "caption_empty"),
    ("dog", "caption_too_short"),
    ("a dog", None),
    ("x" * 1001, "caption_too_long"),
    ("word " * 199 + "end", None),
    ("1234 5678", "caption_not_text"),
    ("!!! ??? ...", "caption_not_text"),
    ("#1 2019-05-04 12:00", "caption_not_text"),
    ("IMG_1234.jpg", "caption_filename_or_url"),
    ("IMG_1234", "caption_filename_or_url"),
    ("DSC0001", "caption_filename_or_url"),
    ("DSCN1234.JPG", "caption_filename_or_url"),
    ("holiday photo 3.png", "caption_filename_or_url"),
    ("https://example.com/images/cat.jpg", "caption_filename_or_url"),
    ("www.example.com", "caption_filename_or_url"),
    ("example.com/photos/123", "caption_filename_or_url"),
    ("Photo of a cat on a sofa", None),
    ("A child in a pink dress is climbing up a set of stairs .", None),
    ("hot NUDE beach party", "caption_blocklisted"),
    ("Sussex county fair", None),      # whole words only
    ("a sextant on a desk", None),
])
def test_default_reasons(caption: str | None, reason: str | None) -> None:
    assert CaptionFilter().reason(caption) == reason


def test_configured_limits_and_blocklist() -> None:
    caption_filter = CaptionFilter(CaptionFilterConfig(min_words=3, max_chars=20, blocklist=["Kitten"]))
    assert caption_filter.reason("two words") == "caption_too_short"
    assert caption_filter.reason("a very long caption here") == "caption_too_long"
    assert caption_filter.reason("a small kitten") == "caption_blocklisted"
    assert caption_filter.reason("a nude statue") is None
    assert CaptionFilter(CaptionFilterConfig(blocklist=[])).reason("nude statue in rome") is None


def test_normalize_caption() -> None:
    assert normalize_caption("  A  Dog,\trunning!!  ") == "a dog, running"
    assert normalize_caption("A dog running.") == normalize_caption("a dog   running")
    assert normalize_caption(None) == ""
    assert normalize_caption("...") == ""
