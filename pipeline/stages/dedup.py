"""Global deduplication as two steps linked by files (as datatrove does it): Ray tasks find the
clusters over every shard at once (pipeline/dedup.py), then an ordinary per-shard stage drops by
that list."""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from filters.dedup import DedupConfig
from pipeline.configtools import ranged
from pipeline.registry import StageSpec, register_stage
from pipeline.schema import CLUSTER_ID, CLUSTER_SIZE, DROP_REASON, DUPLICATE_OF, KEY
from pipeline.stage import RecordStage, Resources, shard_stats
from pipeline.stats import StageStats
from pipeline.storage import Storage

log = logging.getLogger(__name__)
CLUSTERS = "dedup/clusters"


@dataclass
class DedupStageConfig(DedupConfig):
    """Global exact (sha256) and near (pHash Hamming distance) deduplication."""

    enabled: bool = True
    # Up to this many kept rows the search runs in the driver (it holds ~290 bytes a row); above it,
    # as Ray tasks that share the tables (pipeline/dedup.py), whose start-up on cold workers costs
    # more than the in-driver search saves at 1M rows and less above (docs/BENCHMARKS.md).
    # 0: always the distributed search.
    single_machine_max_rows: int = ranged(1_000_000, "[0, inf)")
    resources: Resources = field(default_factory=Resources)


def find_clusters(storage: Storage, input_stage: str, shards: list[str], config: DedupStageConfig,
                  with_rows: list[str] | None = None) -> dict:
    """Write `dedup/clusters/NNNNN.parquet` (by the shard each key came from); resumable as a whole.
    `with_rows`: the shards that still hold kept rows (default: all); only they are searched, as a
    shard whose rows were all dropped earlier lacks the columns the search reads."""
    from pipeline.dedup import (
        count_kept_rows,
        empty_result,
        find_duplicates_distributed,
        find_duplicates_in_driver,
    )

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
    else:  # the search tasks write each searched shard's verdict themselves
        table, counters = find_duplicates_distributed(
            paths, config, n_items=kept, write=functools.partial(write_verdict, storage.url))
    counters["in_driver"] = int(in_driver)  # which search ran (1: the driver)
    unwritten = shards if table is not None else [s for s in shards if s not in wanted]
    table = empty_result()[0] if table is None else table
    # img2dataset keys start with the 5-digit shard id, so each shard's rows can be written apart.
    prefix = pc.utf8_slice_codeunits(table["key"], 0, 5)
    for shard in unwritten:
        storage.write_parquet(f"{CLUSTERS}/{shard}.parquet", table.filter(pc.equal(prefix, shard)))
    counters = {**counters, "seconds": round(time.perf_counter() - start, 3)}
    storage.write_json(f"{CLUSTERS}/counters.json", counters)
    storage.write_text(f"{CLUSTERS}/.done", "")
    return counters


def write_verdict(output: str, path: str, rows: pa.Table) -> None:
    """Write one searched shard's verdict rows (``path``: its input file, named by the shard)."""
    shard = path.rsplit("/", 1)[-1].removesuffix(".parquet")
    Storage(output).write_parquet(f"{CLUSTERS}/{shard}.parquet", rows)


class DedupStage(RecordStage):
    """Adds `duplicate_of`, `cluster_id`, `cluster_size`; drops every non-representative member
    (`exact_duplicate`, `near_duplicate`, `duplicate_caption_and_image`)."""

    name = "dedup"
    barrier = True  # the search reads every shard's hashes; workers read its verdicts from files

    def __init__(self, output: str, input_stage: str, resources: Resources,
                 config: DedupStageConfig | None = None):
        super().__init__(output, input_stage, resources)
        self.config = config or DedupStageConfig(resources=resources)

    def _kept_per_shard(self) -> tuple[list[str], dict[str, int]]:
        """The run's shards, and the rows the stage before kept in each (from its stats files)."""
        shards = self.storage.read_json("input/shards.json")
        found = shard_stats(self.storage, self.input_stage, shards)
        return shards, {s: stats.rows_out for s, stats in found.items() if stats.rows_out}

    def before_run(self) -> None:
        """The search over every shard at once, in the driver or as Ray tasks (resumable as a whole).
        Only shards that still hold kept rows are searched: one whose rows were all dropped earlier
        lacks the columns the search reads."""
        shards, kept = self._kept_per_shard()
        counters = find_clusters(self.storage, self.input_stage, shards, self.config, list(kept))
        log.info("dedup: clusters found over all shards: %s", counters)

    def before_run_uses_cluster(self) -> bool:
        """The distributed search (more kept rows than `single_machine_max_rows`) runs Ray tasks."""
        if self.storage.exists(f"{CLUSTERS}/.done"):
            return False
        return sum(self._kept_per_shard()[1].values()) > self.config.single_machine_max_rows

    def run_counters(self) -> dict[str, float]:
        rel = f"{CLUSTERS}/counters.json"
        if not self.storage.exists(rel):
            return {}
        counters = self.storage.read_json(rel)
        found = {f"search_{k}": int(v) for k, v in counters.items() if k != "seconds"}
        return {**found, "seconds": float(counters.get("seconds", 0.0))}

    def run_shard(self, shard: str) -> StageStats:
        self._clusters = self.storage.read_parquet(f"{CLUSTERS}/{shard}.parquet")
        return super().run_shard(shard)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        clusters = self._clusters
        index = pc.index_in(batch[KEY], value_set=clusters[KEY])
        if pc.any(pc.is_null(index)).as_py():
            raise RuntimeError(f"dedup: {pc.sum(pc.is_null(index)).as_py()} keys have no cluster row")
        picked = clusters.take(index)
        return (batch.append_column(DUPLICATE_OF, picked[DUPLICATE_OF])
                .append_column(CLUSTER_ID, picked[CLUSTER_ID])
                .append_column(CLUSTER_SIZE, picked[CLUSTER_SIZE])
                .append_column(DROP_REASON, picked["dup_reason"]))


def report_section(storage: Storage, summary: dict) -> str:
    """The duplicate cluster sizes: one value per cluster (its representative is no one's duplicate)."""
    from pipeline.report import histogram_section, read_columns, valid_values

    rows = read_columns(storage, "dedup", [CLUSTER_SIZE, DUPLICATE_OF])
    values = None if rows is None else valid_values(rows.filter(pc.is_null(rows[DUPLICATE_OF]))[CLUSTER_SIZE])
    return histogram_section("dedup", "Duplicates", values, "duplicate cluster size", "images per cluster",
                             "hist-cluster", log=True, unit="clusters")


register_stage(StageSpec(
    name="dedup", section="dedup", config=DedupStageConfig, after=("inspect",),
    build=lambda section, ctx: [DedupStage(ctx.output, ctx.input_stage, section.resources, section)],
    columns=(DUPLICATE_OF, CLUSTER_ID, CLUSTER_SIZE), report=report_section,
    description="global exact (sha256) and near (pHash) duplicates; keeps each cluster's largest image"))
