"""Detects translations that are not worth keeping: empty, runaway repetition, far longer than the source."""
from __future__ import annotations

REASONS: tuple[str, ...] = ("empty", "repetition", "too_long")


def _longest_ngram_run(words: list[str], max_n: int) -> int:
    """Longest number of back-to-back copies of any n-gram (n <= max_n) in ``words``."""
    best = 1 if words else 0
    for n in range(1, max_n + 1):
        for start in range(n):  # every phase, so "x a b a b a b" is seen at offset 1
            run = 1
            for i in range(start + n, len(words) - n + 1, n):
                if words[i:i + n] == words[i - n:i]:
                    run += 1
                    best = max(best, run)
                else:
                    run = 1
    return best


def degenerate_reason(source: str, output: str, *, max_length_ratio: float = 3.0, length_slack: int = 4,
                      max_ngram_repeats: int = 4, max_ngram: int = 4) -> str | None:
    """Return why ``output`` (a translation of ``source``) is degenerate, or None when it is usable.

    Lengths are in whitespace words: source and back-translation are both English here, and a pivot
    (German, Russian) has a comparable word count, so one rule serves every leg.
    """
    words = output.split()
    if not words:
        return "empty"
    if max_ngram_repeats > 1 and _longest_ngram_run([w.lower() for w in words], max_ngram) >= max_ngram_repeats:
        return "repetition"
    if len(words) > max_length_ratio * len(source.split()) + length_slack:
        return "too_long"
    return None
