"""The caption-language stage: lingua, loaded once per Ray actor, names every caption's language.

It reads captions only (no image bytes), so it can run on the input shards, before anything is
downloaded, or after any later stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from filters.language import CaptionLanguageConfig, CaptionLanguageFilter
from pipeline.registry import StageSpec, register_stage
from pipeline.schema import CAPTION, DROP_REASON
from pipeline.stage import RecordStage, Resources

CAPTION_LANG = "caption_lang"
CAPTION_LANG_CONFIDENCE = "caption_lang_confidence"
LANGUAGE_COUNTER_PREFIX = "caption_lang_"  # one counter per language seen, e.g. caption_lang_de


@dataclass
class CaptionLanguageStageConfig(CaptionLanguageConfig):
    """Identify each caption's language (lingua, its model inside the package); keep `keep`."""

    resources: Resources = field(default_factory=Resources)


class CaptionLanguageStage(RecordStage):
    """Writes `caption_lang` (ISO 639-1, or `und`) and `caption_lang_confidence`; drops captions
    whose language is not in `keep` or is below `min_confidence` (`caption_language`)."""

    name = "caption_language"
    needs_images = False

    def __init__(self, output: str, input_stage: str, config: CaptionLanguageConfig,
                 resources: Resources | None = None) -> None:
        super().__init__(output, input_stage, resources)
        self.config = config
        self.identifier: CaptionLanguageFilter | None = None

    def setup(self) -> None:
        self.identifier = CaptionLanguageFilter(self.config)
        self.identifier.setup()

    def teardown(self) -> None:
        if self.identifier is not None:
            self.identifier.teardown()
            self.identifier = None

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.identifier is None:
            self.setup()
        languages, confidences = self.identifier.identify(batch[CAPTION].to_pylist())
        reasons = [self.identifier.reason(lang, conf) for lang, conf in zip(languages, confidences)]
        for language in languages:  # the report's language mix, O(languages) per shard
            self.counters[LANGUAGE_COUNTER_PREFIX + language] += 1
        return (batch.append_column(CAPTION_LANG, pa.array(languages, pa.string()))
                .append_column(CAPTION_LANG_CONFIDENCE, pa.array(confidences, pa.float32()))
                .append_column(DROP_REASON, pa.array(reasons, pa.string())))


def report_section(storage, summary: dict) -> str:
    """Captions per identified language, from the stage's counters."""
    from html import escape

    stage = next((s for s in summary["stages"] if s["stage"] == CaptionLanguageStage.name), None)
    counters = (stage or {}).get("counters", {})
    counts = sorted(((k.removeprefix(LANGUAGE_COUNTER_PREFIX), v) for k, v in counters.items()
                     if k.startswith(LANGUAGE_COUNTER_PREFIX)), key=lambda item: -item[1])
    rows = "".join(f"<tr><td>{escape(lang)}</td><td class='n'>{n:,}</td></tr>" for lang, n in counts)
    return (f'<section id="stage-caption_language"><h2>Caption languages</h2><table id="caption-languages">'
            f"<tr><th>language</th><th>captions</th></tr>{rows or '<tr><td colspan=2>none</td></tr>'}"
            "</table></section>")


register_stage(StageSpec(
    name=CaptionLanguageStage.name, section="caption_language", config=CaptionLanguageStageConfig,
    build=lambda section, ctx: [CaptionLanguageStage(ctx.output, ctx.input_stage, section, section.resources)],
    columns=(CAPTION_LANG, CAPTION_LANG_CONFIDENCE), report=report_section,
    description="identify each caption's language; keep the configured ones (before download: no fetch)"))
