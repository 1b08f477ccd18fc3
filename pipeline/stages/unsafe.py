"""The unsafe stage: NudeNet's detector, loaded once per Ray actor, scores every image."""
from __future__ import annotations

import pyarrow as pa

from filters.unsafe import UnsafeFilterConfig, UnsafeScorer
from pipeline.stage import RecordStage, Resources


class UnsafeStage(RecordStage):
    """Writes `unsafe_score`; drops images at or above the threshold (`unsafe_image`)."""

    name = "unsafe"
    needs_images = True

    def __init__(self, output: str, input_stage: str, config: UnsafeFilterConfig, resources: Resources):
        super().__init__(output, input_stage, resources)
        self.config = config
        self.scorer: UnsafeScorer | None = None

    def setup(self) -> None:
        self.scorer = UnsafeScorer(self.config)
        self.scorer.setup()

    def teardown(self) -> None:
        if self.scorer is not None:
            self.scorer.teardown()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.scorer is None:
            self.setup()
        scores = self.scorer.score_batch(batch["image"].to_pylist()).tolist()
        reasons = [self.scorer.reason(s) for s in scores]
        return (batch.append_column("unsafe_score", pa.array(scores, pa.float32()))
                .append_column("drop_reason", pa.array(reasons, pa.string())))
