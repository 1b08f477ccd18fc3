"""Global deduplication as two steps linked by files (as datatrove does it): a Ray Data job finds
the clusters over every shard at once, then an ordinary per-shard stage drops by that list."""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DedupStageConfig
from pipeline.stage import RecordStage, Resources
from pipeline.stats import StageStats
from pipeline.storage import Storage

CLUSTERS = "dedup/clusters"


def find_clusters(storage: Storage, input_stage: str, shards: list[str], config: DedupStageConfig,
                  with_rows: list[str] | None = None) -> dict:
    """Write `dedup/clusters/NNNNN.parquet` (by the shard each key came from); resumable as a whole.
    `with_rows`: the shards that still hold kept rows (default: all); only they are searched, as a
    shard whose rows were all dropped earlier lacks the columns the search reads."""
    from pipeline.dedup import count_kept_rows, empty_result, find_duplicates_in_driver, find_duplicates_ray

    if storage.exists(f"{CLUSTERS}/.done"):
        return storage.read_json(f"{CLUSTERS}/counters.json")
    start = time.perf_counter()
    wanted = set(shards if with_rows is None else with_rows)
    searched = [s for s in shards if s in wanted]
    paths = [storage.full_url(f"{input_stage}/{s}.parquet") for s in searched]
    kept = count_kept_rows(paths) if paths else 0
    in_driver = kept <= config.single_machine_max_rows
    if not kept:  # nothing to compare: no search, no Ray job
        table, counters = empty_result()
    elif in_driver:
        table, counters = find_duplicates_in_driver(paths, config, threads=max(1, int(config.resources.num_cpus)))
    else:
        table, counters = find_duplicates_ray(paths, config, tables_per_shuffle=config.tables_per_shuffle)
    counters["in_driver"] = int(in_driver)  # which search ran (1: the driver)
    # img2dataset keys start with the 5-digit shard id, so each shard's rows can be written apart.
    prefix = pc.utf8_slice_codeunits(table["key"], 0, 5)
    for shard in shards:
        storage.write_parquet(f"{CLUSTERS}/{shard}.parquet", table.filter(pc.equal(prefix, shard)))
    counters = {**counters, "seconds": round(time.perf_counter() - start, 3)}
    storage.write_json(f"{CLUSTERS}/counters.json", counters)
    storage.write_text(f"{CLUSTERS}/.done", "")
    return counters


class DedupStage(RecordStage):
    """Adds `duplicate_of`, `cluster_id`, `cluster_size`; drops every non-representative member
    (`exact_duplicate`, `near_duplicate`, `duplicate_caption_and_image`)."""

    name = "dedup"

    def __init__(self, output: str, input_stage: str, resources: Resources):
        super().__init__(output, input_stage, resources)

    def run_shard(self, shard: str) -> StageStats:
        self._clusters = self.storage.read_parquet(f"{CLUSTERS}/{shard}.parquet")
        return super().run_shard(shard)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        clusters = self._clusters
        index = pc.index_in(batch["key"], value_set=clusters["key"])
        if pc.any(pc.is_null(index)).as_py():
            raise RuntimeError(f"dedup: {pc.sum(pc.is_null(index)).as_py()} keys have no cluster row")
        picked = clusters.take(index)
        return (batch.append_column("duplicate_of", picked["duplicate_of"])
                .append_column("cluster_id", picked["cluster_id"])
                .append_column("cluster_size", picked["cluster_size"])
                .append_column("drop_reason", picked["dup_reason"]))
