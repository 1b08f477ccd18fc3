"""The stage contract: small, Ray-free, testable alone.

A stage turns the shard `NNNNN` of its input folder into the shard `NNNNN` of its own folder.
`setup()` runs once per worker (load a model there), `run_shard()` once per shard, `teardown()` at
the end. Scheduling (workers, CPUs, GPUs, batch size) lives in `Resources`, apart from the
algorithm's own settings. `pipeline/ray_adapter.py` is the one place that runs stages on Ray.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.configtools import FieldError, ranged
from pipeline.schema import DROP_KIND, DROP_REASON  # noqa: F401 (re-exported: the stage vocabulary)
from pipeline.stats import StageStats
from pipeline.storage import Storage

RAY_RESOURCE_RESOLUTION = 0.0001  # Ray's smallest fraction of a CPU or GPU


@dataclass
class Resources:
    """How a stage is scheduled: per-worker CPUs and GPUs, worker count, rows per batch."""

    num_cpus: float = ranged(1.0, "[0, inf)")
    num_gpus: float = ranged(0.0, "[0, inf)")
    concurrency: int | None = ranged(None, "[1, inf)")  # workers; None: as many as the cluster's CPUs allow
    batch_size: int = ranged(256, "[1, inf)")

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise FieldError("num_cpus", "resources need num_cpus > 0 or num_gpus > 0")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            # Ray refuses a fractional request finer than this, but only once the stage starts.
            if 0 < value < RAY_RESOURCE_RESOLUTION:
                raise FieldError(name, f"{value} is out of range: 0 or [{RAY_RESOURCE_RESOLUTION}, inf)")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


class Stage(ABC):
    """One step of the pipeline over shards. Subclasses set `name` and implement `run_shard`."""

    name: ClassVar[str]
    # True when before_run() needs every shard of the stage before it (a global search): the
    # runner finishes the earlier stages first. Its workers may have started before it ran, so
    # they read what it computed from storage, not from attributes it set.
    barrier: ClassVar[bool] = False

    def __init__(self, output: str, resources: Resources | None = None):
        self.output = output
        self.resources = resources or Resources()
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:  # built lazily: fsspec handles are not sent to Ray workers
            self._storage = Storage(self.output)
        return self._storage

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_storage"] = None
        return state

    def before_run(self) -> None:
        """On the driver, once per run, before the stage's first shard (e.g. state the workers
        share). A barrier stage's runs once the stage before it is complete; any other's may run
        as early as the start of the pool of actors that will run it."""

    def before_run_uses_cluster(self) -> bool:
        """True when before_run() runs Ray tasks that need the cluster's CPUs: idle actors of
        earlier stages must let go of them first."""
        return False

    def after_run(self) -> None:
        """On the driver, once per run, after the last worker has stopped."""

    def run_counters(self) -> dict[str, float]:
        """Counters of work done once for the whole run rather than per shard (e.g. a global
        search in `before_run`), merged into the stage's statistics; a `seconds` entry adds time."""
        return {}

    def setup(self) -> None:
        """Load models and other per-worker state once."""

    def teardown(self) -> None:
        """Free what setup() took."""

    @abstractmethod
    def run_shard(self, shard: str) -> StageStats:
        """Process shard `shard` (e.g. "00012"), write its outputs atomically, return its counters."""

    def done_marker(self, shard: str) -> str:
        return f"{self.name}/{shard}.done"

    def is_done(self, shard: str) -> bool:
        return self.storage.exists(self.done_marker(shard))

    def finish_shard(self, shard: str, stats: StageStats) -> None:
        """Counters first, then the marker: a shard is complete only once its marker exists.

        The counters go to `<stage>/NNNNN_stats.json`, img2dataset's name, so that `download/`
        holds one stats file per shard: img2dataset's keys there (count, successes,
        failed_to_download, ...) stay beside ours, none of which has the same name.
        """
        stats.shards = 1
        path = f"{self.name}/{shard}_stats.json"
        found = self.storage.read_json(path) if self.storage.exists(path) else {}
        self.storage.write_json(path, {**found, **stats.to_dict()})
        self.storage.write_text(self.done_marker(shard), "")


def kept_rows(table: pa.Table) -> pa.Table:
    """Rows that a stage passed on: no drop reason (or img2dataset's `success`)."""
    if DROP_REASON in table.column_names:
        return table.filter(pc.is_null(table[DROP_REASON]))
    if "status" in table.column_names:
        return table.filter(pc.equal(table["status"], "success"))
    return table


class RecordStage(Stage):
    """A stage that scores records and decides which to keep, batch by batch.

    It reads the kept rows of `input_stage`'s shard, attaches image bytes from the download tar
    when `needs_images`, calls `process_batch`, and writes every row it received with its score
    columns and `drop_reason` / `drop_kind` (null when kept). The base class does the counting.
    """

    needs_images: ClassVar[bool] = False
    samples_per_reason: int = 4  # thumbnails of dropped rows kept per reason and shard (the report)

    def __init__(self, output: str, input_stage: str, resources: Resources | None = None):
        super().__init__(output, resources)
        self.input_stage = input_stage
        self.counters: Counter = Counter()

    @abstractmethod
    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Return the same rows, in order, with score columns and `drop_reason`/`drop_kind` added."""

    def run_shard(self, shard: str) -> StageStats:
        from pipeline.records import attach_images, finalize_decisions, read_stage_shard

        start = time.perf_counter()
        self.counters = Counter()
        rows = kept_rows(read_stage_shard(self.storage, self.input_stage, shard))
        rows = rows.drop_columns([c for c in (DROP_REASON, DROP_KIND) if c in rows.column_names])
        if self.needs_images:
            rows = attach_images(self.storage, shard, rows)
        outputs, samples = [], []
        taken: Counter = Counter()
        step = self.resources.batch_size
        for offset in range(0, rows.num_rows, step):
            batch = rows.slice(offset, step)
            result = finalize_decisions(self.process_batch(batch))
            if result.num_rows != batch.num_rows:
                raise RuntimeError(f"stage {self.name} returned {result.num_rows} rows for {batch.num_rows}")
            if "image" in result.column_names:
                samples.extend(self._dropped_samples(result, taken))
            outputs.append(result.drop_columns([c for c in ("image",) if c in result.column_names]))
        if samples:
            self.storage.write_parquet(f"{self.name}/samples/{shard}.parquet", pa.Table.from_pylist(samples))
        table = pa.concat_tables(outputs, promote_options="permissive") if outputs else finalize_decisions(
            rows.drop_columns([c for c in ("image",) if c in rows.column_names]))
        self.storage.write_parquet(f"{self.name}/{shard}.parquet", table)
        stats = stats_from_decisions(self.name, table)
        stats.counters.update(self.counters)
        stats.seconds = time.perf_counter() - start
        return stats

    def _dropped_samples(self, result: pa.Table, taken: Counter) -> list[dict]:
        from pipeline.records import thumbnail

        picked = []
        for row in result.filter(pc.invert(pc.is_null(result[DROP_REASON]))).to_pylist():
            reason = row[DROP_REASON]
            if taken[reason] >= self.samples_per_reason:
                continue
            taken[reason] += 1
            picked.append({"key": row.get("key"), "caption": row.get("caption"), "stage": self.name,
                           "reason": reason, "thumbnail": thumbnail(row.get("image"))})
        return picked


def stats_from_decisions(stage: str, table: pa.Table) -> StageStats:
    stats = StageStats(stage=stage, rows_in=table.num_rows)
    reasons = table[DROP_REASON].to_pylist()
    kinds = table[DROP_KIND].to_pylist()
    for reason, kind in zip(reasons, kinds):
        if reason is None:
            stats.rows_out += 1
        elif kind == "failed":
            stats.failed[reason] += 1
        else:
            stats.dropped[reason] += 1
    return stats


def shard_stats(storage: Storage, stage: str, shards: list[str]) -> dict[str, StageStats]:
    """A stage's counters per shard, read from its `NNNNN_stats.json` files (`Stage.finish_shard`).

    A run folder begun by an earlier version holds them in `NNNNN.stats.json` (and in download/
    an `NNNNN_stats.json` with img2dataset's keys only): a resumed run reads those.
    """
    found: dict[str, StageStats] = {}
    for shard in shards:
        for rel in (f"{stage}/{shard}_stats.json", f"{stage}/{shard}.stats.json"):
            data = storage.read_json(rel) if storage.exists(rel) else {}
            if "rows_in" in data:
                found[shard] = StageStats.from_dict(data)
                break
    return found
