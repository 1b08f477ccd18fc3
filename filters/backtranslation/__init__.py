"""Caption back-translation (EN->DE->EN, EN->RU->EN) with MarianMT, free of Ray.

The pipeline wraps ``BackTranslator`` as an actor stage: ``setup()`` once per actor,
``translate(captions)`` per batch, ``teardown()`` at the end.
"""
from .config import DIRECTIONS, BackTranslationConfig, MissingModelError, check_models
from .degenerate import REASONS, degenerate_reason
from .translator import COUNTER_NAMES, BackTranslationResult, BackTranslator

__all__ = ["DIRECTIONS", "REASONS", "COUNTER_NAMES", "BackTranslationConfig", "BackTranslationResult",
           "BackTranslator", "MissingModelError", "check_models", "degenerate_reason"]
