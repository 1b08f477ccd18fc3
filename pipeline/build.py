"""`filip build`: run every stage of the corpus pipeline, resuming where an earlier run stopped."""
from __future__ import annotations

from typing import Callable

from filters.web.address import AddressPolicy
from pipeline.config import PipelineConfig
from pipeline.input import prepare_input
from pipeline.ray_adapter import StageRunner, init_ray, stage_segments
from pipeline.run_folder import OutputInUse, check_output_outside_input, claim_output, record_config
from pipeline.registry import StageContext, registered_stages
from pipeline.stage import Stage, shard_stats
from pipeline.stats import StageStats, merge_all
from pipeline.storage import Storage, url_to_fs

__all__ = ["OutputInUse", "build", "check_before_work", "pipeline_stages"]


def pipeline_stages(config: PipelineConfig) -> tuple[list[Stage], list[str]]:
    """The per-shard stages in the order of `stages:`, and the listed stages switched off by their
    section's `enabled: false`."""
    specs = registered_stages()
    stages: list[Stage] = []
    skipped = []
    previous = "input"
    for name in config.stages:
        spec = specs[name]
        section = getattr(config, spec.section)
        if not getattr(section, "enabled", True):
            skipped.append(name)
            continue
        made = spec.build(section, StageContext(config.run.output, previous, config))
        stages.extend(made)
        previous = made[-1].name
    for stage in stages:
        stage.samples_per_reason = config.shards.dropped_samples_per_reason
    return stages, skipped


def check_before_work(config: PipelineConfig) -> None:
    """Everything that can be known wrong before a single URL is fetched or a file is written."""
    specs = registered_stages()
    for name in config.stages:
        section = getattr(config, specs[name].section)
        if specs[name].check is not None and getattr(section, "enabled", True):
            specs[name].check(section)
    url_to_fs(config.run.input)  # an object store without its package: the same message as the output
    check_output_outside_input(config.run)


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
    stages, skipped = pipeline_stages(config)
    all_stats = [input_stats]
    with_rows = list(shards)  # the shards whose rows are still kept after the last stage run
    with StageRunner(stages, progress) as runner:
        for segment in stage_segments(stages):
            if with_rows:
                runner.run(segment, shards)
            else:
                runner.run_in_driver(segment, shards)
            for stage in segment:
                per_shard = shard_stats(storage, stage.name, shards)
                stats = merge_all(stage.name, per_shard.values())
                with_rows = [s for s in shards if s in per_shard and per_shard[s].rows_out]
                run_level = stage.run_counters()  # work done once for the whole run (the duplicate search)
                if run_level:
                    progress(f"[{stage.name}] over all shards: {run_level}")
                    stats.seconds += float(run_level.pop("seconds", 0.0))
                    stats.counters.update(run_level)
                all_stats.append(stats)
    for name in skipped:
        previous = all_stats[-1].rows_out
        all_stats.append(StageStats(stage=name, rows_in=previous, rows_out=previous, skipped=True))
    stage_names = [s.name for s in stages]
    decisions = write_decisions(storage, stage_names, shards, progress)
    if not with_rows:
        progress(f"[shards] no rows left: every one of the {input_stats.rows_in} input rows was dropped or "
                 "failed; decisions/ says why for each, `filip stats` counts the reasons"
                 if input_stats.rows_in else "[shards] no rows left: the input URL list holds no rows")
    # The last stage's kept rows per shard: the final shards' plan, without reading a row here.
    kept = {s: per_shard[s].rows_out for s in with_rows}
    final, final_stats = write_final_shards(storage, config, stage_names[-1], kept, progress)
    summary = {"stages": [s.to_dict() for s in all_stats], "steps": [decisions.to_dict(), final_stats.to_dict()],
               "shards": shards, "final_shards": final}
    storage.write_json("stats.json", summary)
    return summary
