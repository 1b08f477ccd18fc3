"""Exact reasons of the resolution filter at its boundaries."""
from __future__ import annotations

import pytest

from filters.resolution import ResolutionFilter, ResolutionFilterConfig


@pytest.mark.parametrize(("width", "height", "reason"), [
    (200, 200, None),
    (199, 800, "too_small"),
    (800, 199, "too_small"),
    (0, 0, "too_small"),
    (600, 200, None),          # aspect ratio exactly 3 is kept
    (601, 200, "bad_aspect_ratio"),
    (200, 601, "bad_aspect_ratio"),
    (4000, 3000, None),
])
def test_default_reasons(width: int, height: int, reason: str | None) -> None:
    assert ResolutionFilter().reason(width, height) == reason


def test_config_changes_the_limits() -> None:
    strict = ResolutionFilter(ResolutionFilterConfig(min_side=256, max_aspect_ratio=2.0))
    assert strict.reason(255, 300) == "too_small"
    assert strict.reason(513, 256) == "bad_aspect_ratio"
    assert strict.reason(512, 256) is None
