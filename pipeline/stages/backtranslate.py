"""The back-translation stage: MarianMT EN->DE->EN and EN->RU->EN, models loaded once per actor."""
from __future__ import annotations

import pyarrow as pa

from filters.backtranslation import BackTranslationConfig, BackTranslator
from pipeline.stage import RecordStage, Resources


class BackTranslateStage(RecordStage):
    """Adds `caption_bt_de` and `caption_bt_ru` beside `caption`; drops nothing."""

    name = "backtranslate"

    def __init__(self, output: str, input_stage: str, config: BackTranslationConfig, resources: Resources):
        super().__init__(output, input_stage, resources)
        self.config = config
        self.translator: BackTranslator | None = None

    def setup(self) -> None:
        self.translator = BackTranslator(self.config)
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
        return (batch.append_column("caption_bt_de", pa.array(result.de, pa.string()))
                .append_column("caption_bt_ru", pa.array(result.ru, pa.string())))
