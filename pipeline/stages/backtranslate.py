"""The back-translation stage: MarianMT EN->DE->EN and EN->RU->EN, models loaded once per actor.

A caption is translated once per run, whichever actor meets it: the actors share one cache, a Ray
actor started by the driver before the stage runs (`before_run`). Each normalised caption is
claimed by the first actor that asks; the others wait for its translation instead of computing it.
The cache is bounded (`cache_size` entries, least recently used first out) and lives as long as the
build's driver: a resumed build starts with an empty one (completed shards are not translated again).
"""
from __future__ import annotations

from collections import OrderedDict

import pyarrow as pa

from dataclasses import dataclass, field

from filters.backtranslation import BackTranslationConfig, BackTranslator, check_models
from pipeline.registry import StageSpec, register_stage
from pipeline.schema import CAPTION_BT_DE, CAPTION_BT_RU
from pipeline.stage import RecordStage, Resources

PENDING = None  # claimed, translation not yet delivered
# Column of the back-translation through each pivot, and of why it is null (DEGENERATE) or null.
COLUMNS = {"de": CAPTION_BT_DE, "ru": CAPTION_BT_RU}
REASON_COLUMNS = {pivot: f"{column}_reason" for pivot, column in COLUMNS.items()}



@dataclass
class BackTranslationStageConfig(BackTranslationConfig):
    """Caption back-translation through German and Russian (MarianMT)."""

    resources: Resources = field(default_factory=Resources)


class TranslationCache:
    """The run's shared cache (run as a Ray actor): normalised caption -> (de, ru) or PENDING."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple | None] = OrderedDict()

    def claim(self, keys: list[str]) -> tuple[dict[str, tuple], list[str]]:
        known, mine = {}, []
        for key in keys:
            if key not in self.entries:
                self.entries[key] = PENDING
                mine.append(key)
            elif self.entries[key] is not PENDING:
                self.entries.move_to_end(key)
                known[key] = self.entries[key]
        return known, mine

    def fulfil(self, values: dict[str, tuple]) -> None:
        self.entries.update(values)
        # Evict the oldest finished entries only: a pending claim must stay until it is delivered.
        while len(self.entries) > self.capacity:
            oldest = next((k for k, v in self.entries.items() if v is not PENDING), None)
            if oldest is None:
                break
            del self.entries[oldest]

    def lookup(self, keys: list[str]) -> dict[str, tuple]:
        return {key: self.entries[key] for key in keys if self.entries.get(key) is not PENDING}


class _ActorCache:
    """The SharedCache protocol of filters.backtranslation over the cache actor."""

    def __init__(self, actor):
        self.actor = actor

    def claim(self, keys):
        import ray

        return ray.get(self.actor.claim.remote(keys))

    def fulfil(self, values):
        import ray

        ray.get(self.actor.fulfil.remote(values))

    def lookup(self, keys):
        import ray

        return ray.get(self.actor.lookup.remote(keys))


class BackTranslateStage(RecordStage):
    """Adds `caption_bt_de` and `caption_bt_ru` beside `caption`; drops nothing.

    A degenerate back-translation is null, with "degenerate" in `caption_bt_<pivot>_reason`
    (the rule that fired is counted as `fallback_<rule>`, null rows as `degenerate_rows_<pivot>`).
    """

    name = "backtranslate"

    def __init__(self, output: str, input_stage: str, config: BackTranslationConfig, resources: Resources):
        super().__init__(output, input_stage, resources)
        self.config = config
        self.translator: BackTranslator | None = None
        self.cache_actor = None  # the run's TranslationCache, set on the driver by before_run

    def before_run(self) -> None:
        import ray

        # The handle travels with the stage to its actors (and keeps the cache actor alive).
        self.cache_actor = ray.remote(num_cpus=0)(TranslationCache).remote(self.config.cache_size)

    def after_run(self) -> None:
        import ray

        if self.cache_actor is not None:
            ray.kill(self.cache_actor)
            self.cache_actor = None

    def setup(self) -> None:
        # Without before_run (the stage used outside a Ray run) each translator keeps its own cache.
        shared = _ActorCache(self.cache_actor) if self.cache_actor is not None else None
        self.translator = BackTranslator(self.config, shared_cache=shared)
        self.translator.setup()

    def teardown(self) -> None:
        if self.translator is not None:
            self.translator.teardown()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.translator is None:
            self.setup()
        captions = [c or "" for c in batch["caption"].to_pylist()]
        result = self.translator.translate(captions)
        self.counters.update(result.counters)
        columns = {COLUMNS["de"]: result.de, COLUMNS["ru"]: result.ru,
                   REASON_COLUMNS["de"]: result.de_reason, REASON_COLUMNS["ru"]: result.ru_reason}
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(values, pa.string()))
        return batch


def report_section(storage, summary: dict) -> str:
    """The cache hit rate and the degenerate back-translations left null."""
    from html import escape

    stage = next((s for s in summary["stages"] if s["stage"] == "backtranslate"), None)
    if stage is None or stage.get("skipped"):
        body = '<p class="note">The back-translation stage was skipped or not configured in this run.</p>'
    else:
        counters = stage.get("counters", {})
        hits, misses = counters.get("cache_hits", 0), counters.get("cache_misses", 0)
        rate = f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"
        fallbacks = {k: v for k, v in sorted(counters.items()) if k.startswith("fallback_")}
        rows = "".join(f"<tr><td>{escape(k)}</td><td class='n'>{v:,}</td></tr>" for k, v in fallbacks.items())
        body = (f'<p id="bt-hit-rate" data-hits="{hits}" data-misses="{misses}">Cache hit rate: {rate} '
                f"({hits:,} hits, {misses:,} misses). Degenerate back-translations, left null: "
                f"{sum(fallbacks.values()):,}.</p><table id=\"bt-fallbacks\"><tr><th>fallback</th><th>rows</th>"
                f"</tr>{rows or '<tr><td colspan=2>none</td></tr>'}</table>")
    return f'<section id="backtranslate"><h2>Back-translation</h2>{body}</section>'


register_stage(StageSpec(
    name="backtranslate", section="backtranslation", config=BackTranslationStageConfig,
    build=lambda section, ctx: [BackTranslateStage(ctx.output, ctx.input_stage, section, section.resources)],
    columns=(*COLUMNS.values(), *REASON_COLUMNS.values()), check=check_models, report=report_section,
    description="caption back-translation EN->DE->EN and EN->RU->EN with MarianMT"))
