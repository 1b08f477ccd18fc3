"""Drop images whose original size is too small or too elongated (DataComp's basic filter)."""
from __future__ import annotations

from dataclasses import dataclass

from filters.base import BAD_ASPECT_RATIO, TOO_SMALL
from pipeline.configtools import ranged


@dataclass
class ResolutionFilterConfig:
    """Shorter side at least ``min_side`` pixels; longer/shorter side at most ``max_aspect_ratio``."""

    min_side: int = ranged(200, "[0, inf)")  # 0 keeps every size
    max_aspect_ratio: float = ranged(3.0, "[1, inf)")  # longer / shorter is never below 1


class ResolutionFilter:
    """Keep decision on the ORIGINAL size (img2dataset's original_width/original_height).

    The downloaded copy is resized, so its size says nothing about the source image.
    """

    def __init__(self, config: ResolutionFilterConfig | None = None) -> None:
        self.config = config or ResolutionFilterConfig()

    def reason(self, width: int, height: int) -> str | None:
        shorter, longer = min(width, height), max(width, height)
        if shorter < self.config.min_side:
            return TOO_SMALL
        if longer > self.config.max_aspect_ratio * shorter:
            return BAD_ASPECT_RATIO
        return None
