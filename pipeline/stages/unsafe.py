"""The unsafe stage: NudeNet's detector, loaded once per Ray actor (sized to the actor's CPUs, on
its GPU when it has one), scores every image."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from filters.unsafe import UnsafeFilterConfig, UnsafeScorer
from pipeline.registry import StageSpec, register_stage
from pipeline.schema import DROP_REASON, IMAGE, UNSAFE_SCORE
from pipeline.stage import RecordStage, Resources


@dataclass
class UnsafeStageConfig(UnsafeFilterConfig):
    """The NudeNet unsafe-image filter (onnxruntime on GPU when there is one)."""

    enabled: bool = True
    resources: Resources = field(default_factory=Resources)


class UnsafeStage(RecordStage):
    """Writes `unsafe_score`; drops images at or above the threshold (`unsafe_image`)."""

    name = "unsafe"
    needs_images = True

    def __init__(self, output: str, input_stage: str, config: UnsafeFilterConfig, resources: Resources):
        super().__init__(output, input_stage, resources)
        self.config = config
        self.scorer: UnsafeScorer | None = None

    def setup(self) -> None:
        # One onnxruntime thread per CPU the actor holds; the CUDA provider only on an actor given GPUs.
        threads = max(1, round(self.resources.num_cpus))
        self.scorer = UnsafeScorer(self.config, threads=threads, use_gpu=self.resources.num_gpus > 0)
        self.scorer.setup()

    def teardown(self) -> None:
        if self.scorer is not None:
            self.scorer.teardown()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.scorer is None:
            self.setup()
        scores = self.scorer.score_batch(batch[IMAGE].to_pylist()).tolist()
        reasons = [self.scorer.reason(s) for s in scores]
        return (batch.append_column(UNSAFE_SCORE, pa.array(scores, pa.float32()))
                .append_column(DROP_REASON, pa.array(reasons, pa.string())))


def report_section(storage, summary: dict) -> str:
    """The distribution of unsafe scores over every scored image."""
    from pipeline.report import histogram_section, read_columns, valid_values

    rows = read_columns(storage, "unsafe", [UNSAFE_SCORE])
    values = None if rows is None else valid_values(rows[UNSAFE_SCORE])
    return histogram_section("unsafe", "Unsafe images", values, "unsafe score", "score", "hist-unsafe")


register_stage(StageSpec(
    name="unsafe", section="unsafe", config=UnsafeStageConfig, needs_images=True,
    build=lambda section, ctx: [UnsafeStage(ctx.output, ctx.input_stage, section, section.resources)],
    columns=(UNSAFE_SCORE,), report=report_section,
    description="NudeNet's detector scores every image; drops those at or above the threshold"))
