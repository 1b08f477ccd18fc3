"""Ray-free back-translator: EN->DE->EN and EN->RU->EN for a list of captions, with a caption cache."""
from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from .config import DIRECTIONS, BackTranslationConfig, check_models
from .degenerate import REASONS, degenerate_reason
from .engines import LoadedDirection, load_direction

logger = logging.getLogger(__name__)

try:  # the project-wide caption normaliser, when present, so cache keys match the other stages'
    from filters.caption import normalize_caption as _normalize
except ImportError:
    _SPACES = re.compile(r"\s+")

    def _normalize(caption: str) -> str:
        return _SPACES.sub(" ", caption).strip().lower()

PIVOTS: tuple[str, ...] = ("de", "ru")
Pair = tuple[str | None, str | None]  # (de, ru) back-translations; None: degenerate
DEGENERATE = "degenerate"  # the reason stored beside a back-translation left null
# fallback_<reason>: degenerate translations by rule, once per translated caption and pivot;
# degenerate_rows_<pivot>: output rows whose back-translation is null (cache hits included).
COUNTER_NAMES: tuple[str, ...] = ("cache_hits", "cache_misses", "translated", "model_inputs", "truncated",
                                  *(f"fallback_{r}" for r in REASONS),
                                  *(f"degenerate_rows_{p}" for p in PIVOTS))


@dataclass
class BackTranslationResult:
    """English back-translations in input order; ``counters`` count this call only (they add up).

    A degenerate back-translation is None, with ``DEGENERATE`` at the same index of its
    ``*_reason`` list (None otherwise): a copy of the original would pass for a second original.
    """

    de: list[str | None]
    ru: list[str | None]
    de_reason: list[str | None] = field(default_factory=list)
    ru_reason: list[str | None] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


class SharedCache(Protocol):
    """A translation cache shared by every translator of a run (the pipeline backs it with a Ray actor).

    Each normalised caption is translated by exactly one translator: ``claim`` returns the
    translations already known and the keys the caller now owns; keys owned by another translator
    are neither, and ``lookup`` returns them once their owner has called ``fulfil``.
    """

    def claim(self, keys: list[str]) -> tuple[dict[str, Pair], list[str]]: ...

    def fulfil(self, values: dict[str, Pair]) -> None: ...

    def lookup(self, keys: list[str]) -> dict[str, Pair]: ...


def cuda_visible() -> bool:
    """Whether a CUDA GPU is usable here. A Ray actor given no GPU sees CUDA_VISIBLE_DEVICES="":
    then the answer is no without importing torch, which the CTranslate2 engine on CPU does not need
    (`filters/backtranslation/generation.py` says what it costs)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    import torch

    return torch.cuda.is_available()


class BackTranslator:
    """Loads the four MarianMT models once (``setup``) and back-translates batches of captions.

    Unique captions (by normalised text) are translated once per translator: later occurrences,
    in the same call or a later one, come from an LRU cache. With a ``shared_cache``, once per run
    across translators (see :class:`SharedCache`). A degenerate pivot or back-translation is left
    None (reason ``DEGENERATE``) and counted as ``fallback_<reason>``.
    """

    def __init__(self, config: BackTranslationConfig, shared_cache: SharedCache | None = None,
                 wait_timeout_s: float = 600.0) -> None:
        self.config = config
        self.shared_cache = shared_cache
        self.wait_timeout_s = wait_timeout_s
        self._directions: dict[str, LoadedDirection] = {}
        # normalised caption -> (de, ru); None marks a degenerate back-translation.
        self._cache: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self.device = "cpu"

    def setup(self) -> None:
        """Check and load the four models (no-op when disabled); GPU when available unless told otherwise."""
        if not self.config.enabled or self._directions:
            return
        check_models(self.config)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per model and actor is noise in a pipeline log
        cfg = self.config
        self.device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda_visible()) else "cpu"
        dtype_name = cfg.dtype if cfg.dtype != "auto" else ("float16" if self.device == "cuda" else "float32")
        for direction in DIRECTIONS:
            self._directions[direction] = load_direction(cfg.models[direction], cfg, self.device, dtype_name)
        logger.info("back-translation models loaded on %s (%s, engines %s)", self.device, dtype_name,
                    sorted({d.engine for d in self._directions.values()}))

    @property
    def engines(self) -> dict[str, str]:
        """The engine of each loaded direction (fast, generate or ctranslate2)."""
        return {direction: d.engine for direction, d in self._directions.items()}

    def teardown(self) -> None:
        """Free the models (and GPU memory) and forget the cache."""
        self._directions.clear()
        self._cache.clear()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def translate(self, captions: list[str]) -> BackTranslationResult:
        """Back-translate ``captions`` through German and Russian; outputs align with the inputs."""
        counters: Counter[str] = Counter({name: 0 for name in COUNTER_NAMES})
        if not self.config.enabled:
            counters["skipped"] = len(captions)
            none = [None] * len(captions)
            return BackTranslationResult(de=list(captions), ru=list(captions), de_reason=none,
                                         ru_reason=list(none), counters=dict(counters))
        if not self._directions:
            raise RuntimeError("BackTranslator.setup() must be called before translate()")
        keys = [_normalize(c) for c in captions]
        todo: dict[str, str] = {}  # key -> first caption with that key, in first-seen order
        for key, caption in zip(keys, captions):
            if key in self._cache:
                self._cache.move_to_end(key)
            elif key not in todo:
                todo[key] = caption
        fresh, computed = self._fresh_translations(todo, counters)
        # A miss is the first row of a caption this call translated; every other row is a hit
        # (local cache, shared cache, or a repeat within the call).
        for key in keys:
            counters["cache_misses" if key in computed else "cache_hits"] += 1
            computed.discard(key)
        pairs = [fresh[key] if key in fresh else self._cache[key] for key in keys]
        de, ru = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        reasons = {pivot: [DEGENERATE if text is None else None for text in texts]
                   for pivot, texts in zip(PIVOTS, (de, ru))}
        for pivot in PIVOTS:
            counters[f"degenerate_rows_{pivot}"] += reasons[pivot].count(DEGENERATE)
        for key, pair in fresh.items():
            self._cache[key] = pair
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
        return BackTranslationResult(de=de, ru=ru, de_reason=reasons["de"], ru_reason=reasons["ru"],
                                     counters=dict(counters))

    def _translate_now(self, todo: dict[str, str], counters: Counter[str]) -> dict[str, Pair]:
        if not todo:
            return {}
        counters["translated"] += len(todo)
        return dict(zip(todo, zip(*self._back_translate(list(todo.values()), counters))))

    def _fresh_translations(self, todo: dict[str, str], counters: Counter[str]
                            ) -> tuple[dict[str, Pair], set[str]]:
        """Translations of the keys in ``todo`` (shared cache or computed here), and the computed keys."""
        if self.shared_cache is None:
            fresh = self._translate_now(todo, counters)
            return fresh, set(fresh)
        known, mine = self.shared_cache.claim(list(todo))
        fresh = self._translate_now({key: todo[key] for key in mine}, counters)
        self.shared_cache.fulfil(fresh)  # before waiting on others: two callers never wait on each other
        waiting = [key for key in todo if key not in known and key not in fresh]
        deadline = time.monotonic() + self.wait_timeout_s
        delay = 0.01
        while waiting and time.monotonic() < deadline:
            known.update(self.shared_cache.lookup(waiting))
            waiting = [key for key in waiting if key not in known]
            if waiting:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        if waiting:  # the owner died or stalls: translate them here rather than block the run
            counters["shared_cache_timeouts"] += len(waiting)
            own = self._translate_now({key: todo[key] for key in waiting}, counters)
            self.shared_cache.fulfil(own)
            fresh.update(own)
        counters["shared_cache_hits"] += len(known)
        return {**known, **fresh}, set(fresh)

    def _back_translate(self, sources: list[str], counters: Counter[str]) -> list[list[str | None]]:
        """[[de_en or None per source], [ru_en or None per source]]; None where the output is degenerate."""
        cfg = self.config
        per_pivot = []
        for pivot in PIVOTS:
            middle = self._run(f"en_{pivot}", sources, counters)
            back = self._run(f"{pivot}_en", middle, counters)
            kept: list[str | None] = []
            for src, mid, out in zip(sources, middle, back):
                reason = None
                for text in (mid, out):
                    reason = reason or degenerate_reason(
                        src, text, max_length_ratio=cfg.max_length_ratio, length_slack=cfg.length_slack,
                        max_ngram_repeats=cfg.max_ngram_repeats)
                if reason:
                    counters[f"fallback_{reason}"] += 1
                kept.append(None if reason else out)
            per_pivot.append(kept)
        return per_pivot

    def _run(self, direction: str, texts: list[str], counters: Counter[str]) -> list[str]:
        """Translate ``texts`` with one model: truncate, sort by token length, batch, restore order."""
        cfg = self.config
        d = self._directions[direction]
        tok = d.tokenizer
        ids = tok(texts, truncation=False, padding=False)["input_ids"]
        for i, seq in enumerate(ids):
            if len(seq) > cfg.max_input_tokens:
                counters["truncated"] += 1
                ids[i] = seq[:cfg.max_input_tokens - 1] + [tok.eos_token_id]
        counters["model_inputs"] += len(texts)
        if d.ct2 is not None:
            return d.ct2.translate(ids, cfg.num_beams, cfg.max_new_tokens, cfg.batch_size)
        import torch  # the transformers engines only: CTranslate2 runs without it

        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[str] = [""] * len(ids)
        # Graph shapes are reused when source lengths are rounded up to a multiple of 8.
        multiple = 8 if d.fast is not None and d.fast.use_graphs else 1
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start:start + cfg.batch_size]
            width = -(-max(len(ids[i]) for i in chunk) // multiple) * multiple
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            if d.fast is not None:
                generated = d.fast.generate(input_ids, mask, max_new_tokens=cfg.max_new_tokens)
            else:
                with torch.inference_mode():
                    generated = d.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                                 num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)
            for i, text in zip(chunk, tok.batch_decode(generated.cpu(), skip_special_tokens=True)):
                out[i] = text
        return out
