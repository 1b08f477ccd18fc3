"""The tests build their translation models with the package's tiny-model builder (also used by the demo)."""
from filters.backtranslation.tiny_models import (  # noqa: F401 - re-exported for the tests
    DIRECTIONS, build_tiny_marian, build_tiny_marian_models, train_sentencepiece)
