"""Image-text agreement scored by our own checkpoint (filters/agreement.py), in two steps linked by files.

`filip_score` scores every pair it receives, writes `filip_score` (float32, null where the image
does not decode) and, per shard, a fixed-bin histogram of the scores
(`filip_score/histograms/NNNNN.json`, only the bins in use). With `threshold` it drops the pairs
below it itself. With `keep_top_fraction` it drops nothing and `filip_cut` follows it: its
`before_run` (on the driver) merges the histograms of every shard of the run into the run's cut
(`filip_cut/cut.json`, O(shards) files of at most 20,000 bins each, never a row), and each of its
shards drops the pairs below the cut (`low_image_text_agreement`). The cut is the lower edge of the
1e-4-wide bin holding the exact quantile (filters/agreement.py `top_fraction_cut`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.agreement import (BIN_WIDTH, EDGES, N_BINS, AgreementConfig, AgreementScorer,
                               checked_checkpoint, score_histogram, top_fraction_cut)
from filters.base import DECODE_ERROR, LOW_AGREEMENT
from pipeline.errors import UserError
from pipeline.registry import StageSpec, register_stage
from pipeline.stage import DROP_KIND, DROP_REASON, RecordStage, Resources, Stage
from pipeline.stats import StageStats

FILIP_SCORE = "filip_score"
HISTOGRAMS = "filip_score/histograms"
CUT_FILE = "filip_cut/cut.json"


@dataclass
class FilipScoreStageConfig(AgreementConfig):
    """Score each pair with a checkpoint of the bundled trainer; keep the best (DataComp's baseline)."""

    resources: Resources = field(default_factory=Resources)


def agreement_stages(output: str, input_stage: str, config: AgreementConfig,
                     resources: Resources | None = None) -> list[Stage]:
    """The stages to run, in order: the scoring, then the run-wide cut when `keep_top_fraction` is set."""
    score = FilipScoreStage(output, input_stage, config, resources)
    if config.keep_top_fraction is None:
        return [score]
    # The cut reads only the score column: one CPU and large batches whatever the scoring needed.
    return [score, FilipCutStage(output, config, Resources(num_cpus=1.0, batch_size=65_536))]


class FilipScoreStage(RecordStage):
    """Writes `filip_score`; with `threshold`, drops the pairs below it (`low_image_text_agreement`);
    an image that does not decode fails (`decode_error`)."""

    name = "filip_score"
    needs_images = True

    def __init__(self, output: str, input_stage: str, config: AgreementConfig,
                 resources: Resources | None = None) -> None:
        super().__init__(output, input_stage, resources)
        self.config = config
        self.scorer: AgreementScorer | None = None
        self._histogram = np.zeros(N_BINS, dtype=np.int64)

    def before_run(self) -> None:
        """On the driver: a missing checkpoint fails here, before any worker loads torch."""
        checked_checkpoint(self.config)

    def setup(self) -> None:
        # torch threads = the CPUs the worker holds (its default, every core of the node, oversubscribes).
        self.scorer = AgreementScorer(self.config, use_gpu=self.resources.num_gpus > 0,
                                      threads=max(1, round(self.resources.num_cpus)))
        self.scorer.setup()

    def teardown(self) -> None:
        if self.scorer is not None:
            self.scorer.teardown()
            self.scorer = None

    def run_shard(self, shard: str) -> StageStats:
        self._histogram = np.zeros(N_BINS, dtype=np.int64)
        stats = super().run_shard(shard)
        # After the shard's rows, before its marker (finish_shard): a rerun redoes both or neither.
        used = np.flatnonzero(self._histogram)
        self.storage.write_json(f"{HISTOGRAMS}/{shard}.json", {
            "bin_width": BIN_WIDTH, "low": float(EDGES[0]), "bins": used.tolist(),
            "counts": self._histogram[used].tolist()})
        return stats

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.scorer is None:
            self.setup()
        scores = self.scorer.score(batch["image"].to_pylist(), batch["caption"].to_pylist())
        self._histogram += score_histogram(scores)
        failed = np.isnan(scores)
        reasons = [DECODE_ERROR if bad else self.scorer.reason(float(s), self.config.threshold)
                   for s, bad in zip(scores, failed)]
        return (batch.append_column(FILIP_SCORE, pa.array(scores, pa.float32(), mask=failed))
                .append_column(DROP_REASON, pa.array(reasons, pa.string()))
                .append_column(DROP_KIND, pa.array(["failed" if bad else None for bad in failed], pa.string())))


def run_shards(stage: Stage) -> list[str]:
    """The run's shards: `input/shards.json` (the input stage's list), else the scored shards."""
    if stage.storage.exists("input/shards.json"):
        return list(stage.storage.read_json("input/shards.json"))
    return [rel.rsplit("/", 1)[-1].removesuffix(".done") for rel in stage.storage.glob(f"{FILIP_SCORE}/*.done")]


def merge_histograms(stage: Stage, shards: list[str]) -> np.ndarray:
    """The run's histogram from every shard's file; a shard not scored yet is an error."""
    missing = [s for s in shards if not stage.storage.exists(f"{FILIP_SCORE}/{s}.done")]
    if missing:
        raise UserError(f"{stage.storage.full_url(FILIP_SCORE)}: {len(missing)} shard(s) not scored yet "
                        f"(e.g. {missing[0]}); the run-wide cut needs every shard's scores")
    counts = np.zeros(N_BINS, dtype=np.int64)
    for shard in shards:
        found = stage.storage.read_json(f"{HISTOGRAMS}/{shard}.json")
        if found["bin_width"] != BIN_WIDTH or found["low"] != float(EDGES[0]):
            raise UserError(f"{stage.storage.full_url(f'{HISTOGRAMS}/{shard}.json')}: bins of width "
                            f"{found['bin_width']} from {found['low']}, expected {BIN_WIDTH} from {EDGES[0]}")
        np.add.at(counts, np.asarray(found["bins"], dtype=np.int64), np.asarray(found["counts"], dtype=np.int64))
    return counts


class FilipCutStage(RecordStage):
    """Drops the pairs below the run's `keep_top_fraction` cut (`low_image_text_agreement`)."""

    name = "filip_cut"
    needs_images = False
    barrier = True  # the cut needs every shard's histogram; workers read it from cut.json

    def __init__(self, output: str, config: AgreementConfig, resources: Resources | None = None,
                 input_stage: str = FILIP_SCORE) -> None:
        super().__init__(output, input_stage, resources)
        if config.keep_top_fraction is None:
            raise ValueError("filip_cut needs keep_top_fraction (with a threshold, filip_score drops)")
        self.config = config
        self.cut: dict | None = None

    def before_run(self) -> None:
        self.cut = self.global_cut()

    def global_cut(self) -> dict:
        """`filip_cut/cut.json`, computed once per run from every shard's histogram, then reused:
        a resumed run cuts its remaining shards where the first run cut the others."""
        if self.storage.exists(CUT_FILE):
            found = self.storage.read_json(CUT_FILE)
            if found["keep_top_fraction"] != self.config.keep_top_fraction:
                raise UserError(f"{self.storage.full_url(CUT_FILE)}: computed for keep_top_fraction "
                                f"{found['keep_top_fraction']}, not {self.config.keep_top_fraction}; "
                                f"remove the filip_cut folder to cut again")
            return found
        shards = run_shards(self)
        result = top_fraction_cut(merge_histograms(self, shards), self.config.keep_top_fraction)
        cut = {"keep_top_fraction": self.config.keep_top_fraction, "cut": result.cut,
               "cut_bin": result.cut_bin, "bin_width": BIN_WIDTH, "rows": result.rows,
               "target": result.target, "kept": result.kept, "shards": len(shards)}
        self.storage.write_json(CUT_FILE, cut)
        return cut

    def run_shard(self, shard: str) -> StageStats:
        if self.cut is None:  # a worker: the driver's before_run wrote the file
            self.cut = self.global_cut()
        return super().run_shard(shard)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        cut = self.cut["cut"]
        if cut is None:
            below = pa.array([False] * batch.num_rows)
        else:  # float32 scores against a float32 edge: exactly the rows the histogram put below
            below = pc.fill_null(pc.less(batch[FILIP_SCORE], pa.scalar(cut, pa.float32())), False)
        reasons = pc.if_else(below, pa.scalar(LOW_AGREEMENT), pa.scalar(None, pa.string()))
        return batch.append_column(DROP_REASON, reasons)


def report_section(storage, summary: dict) -> str:
    """The distribution of image-text agreement scores."""
    from pipeline.report import histogram_section, read_columns, valid_values

    rows = read_columns(storage, FILIP_SCORE, [FILIP_SCORE])
    values = None if rows is None else valid_values(rows[FILIP_SCORE])
    return histogram_section(FILIP_SCORE, "Image-text agreement", values, "filip score", "score", "hist-filip-score")


register_stage(StageSpec(
    name=FILIP_SCORE, section="filip_score", config=FilipScoreStageConfig, needs_images=True,
    build=lambda section, ctx: agreement_stages(ctx.output, ctx.input_stage, section, section.resources),
    columns=(FILIP_SCORE,), check=checked_checkpoint, report=report_section,
    description="score each pair with our own checkpoint; drop below a threshold or keep a top fraction"))
