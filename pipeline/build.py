"""`filip build`: run every stage of the corpus pipeline, resuming where an earlier run stopped."""
from __future__ import annotations

import logging
from typing import Callable

from filters.web.address import AddressPolicy
from pipeline.config import PipelineConfig
from pipeline.input import prepare_input
from pipeline.ray_adapter import init_ray, run_stage
from pipeline.run_folder import OutputInUse, check_output_outside_input, claim_output, record_config
from pipeline.stage import Stage
from pipeline.stats import StageStats, merge_all
from pipeline.storage import Storage, url_to_fs

log = logging.getLogger(__name__)
__all__ = ["OutputInUse", "build", "check_before_work", "pipeline_stages"]


def pipeline_stages(config: PipelineConfig) -> tuple[list[Stage], list[str]]:
    """The per-shard stages in order, and the names of the stages switched off by the config."""
    from pipeline.download import DownloadStage
    from pipeline.stages.inspect import InspectStage

    out = config.run.output
    stages: list[Stage] = [DownloadStage(out, config.download, config.run.shard_size)]
    stages.append(InspectStage(out, stages[-1].name, config.inspect.resolution, config.inspect.caption,
                               config.inspect.resources))
    skipped = []
    if config.dedup.enabled:
        from pipeline.stages.dedup import DedupStage

        stages.append(DedupStage(out, stages[-1].name, config.dedup.resources))
    else:
        skipped.append("dedup")
    if config.unsafe.enabled:
        from pipeline.stages.unsafe import UnsafeStage

        stages.append(UnsafeStage(out, stages[-1].name, config.unsafe, config.unsafe.resources))
    else:
        skipped.append("unsafe")
    if config.backtranslation.enabled:
        from pipeline.stages.backtranslate import BackTranslateStage

        stages.append(BackTranslateStage(out, stages[-1].name, config.backtranslation,
                                         config.backtranslation.resources))
    else:
        skipped.append("backtranslate")
    for stage in stages:
        stage.samples_per_reason = config.shards.dropped_samples_per_reason
    return stages, skipped


def check_before_work(config: PipelineConfig) -> None:
    """Everything that can be known wrong before a single URL is fetched or a file is written."""
    if config.backtranslation.enabled:
        from filters.backtranslation import check_models

        check_models(config.backtranslation)
    url_to_fs(config.run.input)  # an object store without its package: the same message as the output
    check_output_outside_input(config.run)


def shard_stats(storage: Storage, stage: str, shards: list[str]) -> dict[str, StageStats]:
    """A stage's counters per shard, read from its per-shard files on disk."""
    return {s: StageStats.from_dict(storage.read_json(f"{stage}/{s}.stats.json"))
            for s in shards if storage.exists(f"{stage}/{s}.stats.json")}


def _run_without_rows(stage: Stage, shards: list[str], progress: Callable[[str], None]) -> None:
    """Write the stage's empty shards here, in the driver: with no row to score, starting workers
    and loading a model (NudeNet, MarianMT) would cost minutes for nothing."""
    for shard in shards:
        if not stage.is_done(shard):
            stage.finish_shard(shard, stage.run_shard(shard))
    progress(f"[{stage.name}] no rows left: {len(shards)} empty shard(s) written without workers")


def _size_shuffles(n_shards: int) -> None:
    # Ray Data's default of 200 shuffle partitions costs ~30 s of task overhead on a small run;
    # one partition per input shard (at most 200) keeps partitions about a shard's size.
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    context.default_hash_shuffle_parallelism = max(1, min(200, n_shards))
    # Task-based shuffles: no aggregator actors to start, which on a small run is most of the cost.
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def build(config: PipelineConfig, progress: Callable[[str], None] = print) -> dict:
    """Run the pipeline; returns the merged statistics (also written to `<output>/stats.json`)."""
    from pipeline.decisions import write_decisions
    from pipeline.shards import write_final_shards

    check_before_work(config)
    storage = Storage(config.run.output)
    storage.check_writable()
    claim_output(config, storage, progress)
    shards, input_stats = prepare_input(
        config.run, storage, AddressPolicy.from_strings(config.download.allow_networks))
    record_config(config, storage)  # only now: a config or input refused above costs no resume
    progress(f"[input] {input_stats.rows_in} rows: {input_stats.rows_out} to download in "
             f"{len(shards)} shard(s), {input_stats.n_dropped} dropped")
    if shards:  # with nothing to download, every stage runs without workers: no Ray to start
        init_ray(config.run.ray_address)
        _size_shuffles(len(shards))
    stages, skipped = pipeline_stages(config)
    all_stats = [input_stats]
    with_rows = list(shards)  # the shards whose rows are still kept after the last stage run
    for stage in stages:
        if stage.name == "dedup":
            from pipeline.stages.dedup import find_clusters

            counters = find_clusters(storage, stage.input_stage, shards, config.dedup, with_rows)
            progress(f"[dedup] clusters found over all shards: {counters}")
        if with_rows:
            run_stage(stage, shards, progress)
        else:
            _run_without_rows(stage, shards, progress)
        per_shard = shard_stats(storage, stage.name, shards)
        stats = merge_all(stage.name, per_shard.values())
        with_rows = [s for s in shards if s in per_shard and per_shard[s].rows_out]
        if stage.name == "dedup":
            stats.counters.update({f"search_{k}": int(v) for k, v in counters.items() if k != "seconds"})
            stats.seconds += float(counters.get("seconds", 0.0))
        all_stats.append(stats)
    for name in skipped:
        previous = all_stats[-1].rows_out
        all_stats.append(StageStats(stage=name, rows_in=previous, rows_out=previous, skipped=True))
    stage_names = [s.name for s in stages]
    decisions = write_decisions(storage, stage_names, shards)
    progress(f"[decisions] {decisions.num_rows} rows recorded in decisions.parquet")
    if not with_rows:
        progress(f"[shards] no rows left: every one of the {input_stats.rows_in} input rows was dropped or "
                 "failed; decisions.parquet says why for each, `filip stats` counts the reasons"
                 if input_stats.rows_in else "[shards] no rows left: the input URL list holds no rows")
    final = write_final_shards(storage, config, stage_names[-1], with_rows, progress)
    summary = {"stages": [s.to_dict() for s in all_stats], "shards": shards, "final_shards": final}
    storage.write_json("stats.json", summary)
    return summary
