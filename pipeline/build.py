"""`filip build`: run every stage of the corpus pipeline, resuming where an earlier run stopped."""
from __future__ import annotations

import logging
from typing import Callable

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


def pipeline_stages(config: PipelineConfig) -> list[Stage]:
    """The per-shard stages in order (global steps are run between them by `build`)."""
    from pipeline.download import DownloadStage

    return [DownloadStage(config.run.output, config.download, config.run.shard_size)]


def collect_stats(storage: Storage, stage: str, shards: list[str]) -> StageStats:
    """A stage's counters merged from its per-shard files on disk."""
    items = [StageStats.from_dict(storage.read_json(f"{stage}/{s}.stats.json"))
             for s in shards if storage.exists(f"{stage}/{s}.stats.json")]
    return merge_all(stage, items)


def build(config: PipelineConfig, progress: Callable[[str], None] = print) -> dict:
    """Run the pipeline; returns the merged statistics (also written to `<output>/stats.json`)."""
    storage = Storage(config.run.output)
    storage.makedirs("")
    _record_config(config, storage)
    shards, input_stats = prepare_input(config.run, storage)
    progress(f"[input] {input_stats.rows_in} rows: {input_stats.rows_out} to download in "
             f"{len(shards)} shard(s), {input_stats.n_dropped} dropped")
    init_ray(config.run.ray_address)
    all_stats = [input_stats]
    for stage in pipeline_stages(config):
        run_stage(stage, shards, progress)
        all_stats.append(collect_stats(storage, stage.name, shards))
    from pipeline.decisions import write_decisions

    stage_names = [s.stage for s in all_stats[1:]]
    decisions = write_decisions(storage, stage_names, shards)
    progress(f"[decisions] {decisions.num_rows} rows recorded in decisions.parquet")
    summary = {"stages": [s.to_dict() for s in all_stats], "shards": shards}
    storage.write_json("stats.json", summary)
    return summary
