"""`filip build`: run every stage of the corpus pipeline, resuming where an earlier run stopped."""
from __future__ import annotations

import logging
from typing import Callable

from filters.web.address import AddressPolicy
from pipeline.config import PipelineConfig, dump_yaml
from pipeline.input import prepare_input
from pipeline.ray_adapter import init_ray, run_stage
from pipeline.stage import Stage
from pipeline.stats import StageStats, merge_all
from pipeline.storage import Storage

log = logging.getLogger(__name__)
CONFIG_FILE = "config.resolved.yaml"


class OutputInUse(RuntimeError):
    """The output folder holds a run made with another config."""


def _record_config(config: PipelineConfig, storage: Storage) -> None:
    # ray_address may differ between a run and its resume (another cluster); nothing else may.
    text = dump_yaml(config)
    comparable = lambda t: "\n".join(line for line in t.splitlines() if "ray_address" not in line)
    if storage.exists(CONFIG_FILE):
        previous = storage.read_bytes(CONFIG_FILE).decode()
        if comparable(previous) != comparable(text):
            raise OutputInUse(
                f"{storage.full_url(CONFIG_FILE)}: this output folder holds a run made with another "
                "config; resuming would mix the two. Use a new output folder, or restore the config.")
        return
    storage.write_text(CONFIG_FILE, text)


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
    """Everything that can be known wrong before a single URL is fetched."""
    if config.backtranslation.enabled:
        from filters.backtranslation import check_models

        check_models(config.backtranslation)


def collect_stats(storage: Storage, stage: str, shards: list[str]) -> StageStats:
    """A stage's counters merged from its per-shard files on disk."""
    items = [StageStats.from_dict(storage.read_json(f"{stage}/{s}.stats.json"))
             for s in shards if storage.exists(f"{stage}/{s}.stats.json")]
    return merge_all(stage, items)


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
    storage.makedirs("")
    _record_config(config, storage)
    shards, input_stats = prepare_input(
        config.run, storage, AddressPolicy.from_strings(config.download.allow_networks))
    progress(f"[input] {input_stats.rows_in} rows: {input_stats.rows_out} to download in "
             f"{len(shards)} shard(s), {input_stats.n_dropped} dropped")
    init_ray(config.run.ray_address)
    _size_shuffles(len(shards))
    stages, skipped = pipeline_stages(config)
    all_stats = [input_stats]
    for stage in stages:
        if stage.name == "dedup":
            from pipeline.stages.dedup import find_clusters

            counters = find_clusters(storage, stage.input_stage, shards, config.dedup)
            progress(f"[dedup] clusters found over all shards: {counters}")
        run_stage(stage, shards, progress)
        stats = collect_stats(storage, stage.name, shards)
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
    final = write_final_shards(storage, config, stage_names[-1], shards, progress)
    summary = {"stages": [s.to_dict() for s in all_stats], "shards": shards, "final_shards": final}
    storage.write_json("stats.json", summary)
    return summary
