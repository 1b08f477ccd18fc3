"""The one adapter between the Ray-free stage contract and Ray.

Each stage runs as a pool of Ray actors (`pipeline/actor_pool.py`: setup() once per actor, so a
model loads once per worker); the driver hands one shard at a time to each idle actor. A shard
whose `.done` marker exists is skipped, which is what makes a re-run after a crash resume where it
stopped.

Two failures are retried, each a bounded number of times per shard: a shard that raises (its actor
lives on and reports the error), and an actor that dies under its shard (out of memory, a segfault
in a native library, its node lost). A dead actor is replaced by a new one, placed by Ray wherever
the cluster has room, and its shard goes back in the queue. Every retry is counted in the shard's
own stats (`counters.retries`), so the stage's merged stats in stats.json show it.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Callable

from pipeline.actor_pool import ActorsCannotStart, StageActorPool
from pipeline.stage import Stage
from pipeline.stats import StageStats

log = logging.getLogger(__name__)
# Ray starts workers at `worker_niceness` 15: on a node shared with other work at nice 0 the stages
# lose the CPU (issue 15: a 174 s build took 1,114 s at load 8-16). 0 leaves a worker at the priority it
# inherits from the raylet, which a local instance inherits from the driver.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import pipeline/ and filters/ from the installed package; on a cluster every node
    # installs the project, as `ray start` does not ship code. No runtime_env: it would make Ray
    # start new workers for it instead of the ones it prestarts (two actors ready in 0.3 s instead of
    # 1.0 s, `bench/fixed_costs.py`).
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        # "local": a new instance, never the cluster a `ray start` on this machine left recorded
        # in /tmp/ray/ray_current_cluster (which ray.init() without an address would join).
        ray.init(address="local", num_cpus=num_cpus, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)


def stop_ray() -> None:
    """Leave Ray: disconnect from a cluster, or stop the local instance this process started.

    The local instance's autoscaler monitor, which has nothing to scale on one machine and nothing
    to save, takes 1 s to exit on SIGTERM, most of a shutdown's time: it is killed outright first.
    """
    import ray

    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)  # ray is pinned: see pyproject.toml
    processes = getattr(node, "all_processes", {}) if node is not None and node.head else {}
    for info in processes.get("monitor", []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=10)
    ray.shutdown()


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


class StageFailed(RuntimeError):
    """Some shards failed for good; completed shards are kept and a re-run retries only those."""


def resource_shape(stage: Stage) -> tuple:
    """Stages with the same shape share one pool of actors (`StageRunner`)."""
    res = stage.resources
    return (res.num_cpus, res.num_gpus, res.concurrency)


def _shape_text(stage: Stage) -> str:
    res = stage.resources
    text = f"{res.num_cpus:g} CPU" + (f", {res.num_gpus:g} GPU" if res.num_gpus else "")
    return text + ("" if res.concurrency is None else f", concurrency {res.concurrency}")


def _workers(stage: Stage, n_pending: int) -> int:
    res = stage.resources
    if res.concurrency is not None:
        workers = res.concurrency
    elif res.num_gpus > 0:
        workers = max(1, int(_cluster_gpus() // res.num_gpus))
    else:
        workers = max(1, int(_cluster_cpus() // max(res.num_cpus, 0.01)))
    return min(workers, n_pending)


def stage_segments(stages: list[Stage]) -> list[list[Stage]]:
    """The stages cut before each barrier (a stage whose before_run needs every shard of the stage
    before it, such as the duplicate search): within a segment a shard flows from stage to stage."""
    segments: list[list[Stage]] = []
    for stage in stages:
        if not segments or stage.barrier:
            segments.append([])
        segments[-1].append(stage)
    return segments


class StageRunner:
    """Runs segments of stages over shards, on pools of Ray actors that outlive a single stage.

    Consecutive stages with the same resource shape (CPUs, GPUs, concurrency) share one pool: its
    actors hold all of them, set up the first segment's stages before taking shards and load the
    later ones' models in the background, and run each shard through every stage of a segment
    in one go. A stage whose shape differs starts a new pool once the previous one is closed, so
    two pools never wait on each other's CPUs. Per-stage resume is unchanged: every stage writes
    its own shard outputs and `.done` marker, and only the stages a shard still lacks are run.

    `stages`: every stage of the run, in order (the pools are planned from it).
    """

    def __init__(self, stages: list[Stage], progress: Callable[[str], None] | None = None,
                 max_retries: int = 1, max_actor_deaths: int = 3, start_timeout: float = 900.0):
        self.stages = stages
        self.say = progress or (lambda msg: log.info(msg))
        self.max_retries = max_retries
        self.max_actor_deaths = max_actor_deaths
        self.start_timeout = start_timeout
        self.pool: StageActorPool | None = None
        self.prepared: set[str] = set()  # stages whose before_run has run on the driver

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close(teardown=exc[0] is None)

    def _close_pool(self, teardown: bool = True) -> None:
        if self.pool is not None:
            self.pool.close(teardown=teardown)
            self.pool = None

    def close(self, teardown: bool = True) -> None:
        """Stop the pool; after_run() of the stages prepared for it but never run (no rows
        reached them)."""
        self._close_pool(teardown)
        if teardown:
            for stage in self.stages:
                if stage.name in self.prepared:
                    stage.after_run()
            self.prepared.clear()

    def run_in_driver(self, segment: list[Stage], shards: list[str]) -> None:
        """Write the segment's empty shards here, in the driver, when no shard holds a kept row:
        starting workers and loading a model (NudeNet, MarianMT) would cost minutes for nothing."""
        for stage in segment:
            pending = [s for s in shards if not stage.is_done(s)]
            if pending:
                self._prepare([stage])
            for shard in pending:
                stage.finish_shard(shard, stage.run_shard(shard))
            self.say(f"[{stage.name}] no rows left: {len(shards)} empty shard(s) written without workers")

    def _pool_group(self, first: Stage, shards: list[str]) -> list[Stage]:
        """`first` and the stages after it of the same shape, up to the first of another shape,
        that still have shards to do."""
        index = self.stages.index(first)
        group = [first]
        for stage in self.stages[index + 1:]:
            if resource_shape(stage) != resource_shape(first):
                break
            group.append(stage)
        return [s for s in group if s is first or any(not s.is_done(shard) for shard in shards)]

    def run(self, segment: list[Stage], shards: list[str]) -> dict[str, list[StageStats]]:
        """Run every stage of `segment` over `shards`, skipping completed (stage, shard) pairs.
        Returns each stage's stats of the shards it completed now."""
        done: dict[str, list[StageStats]] = {stage.name: [] for stage in segment}
        part: list[Stage] = []
        for stage in segment:  # parts of one shape; a new shape waits for the previous part
            if part and resource_shape(stage) != resource_shape(part[0]):
                done.update(self._run_part(part, shards))
                part = []
            part.append(stage)
        done.update(self._run_part(part, shards))
        return done

    def _run_part(self, part: list[Stage], shards: list[str]) -> dict[str, list[StageStats]]:
        pending = {stage.name: [s for s in shards if not stage.is_done(s)] for stage in part}
        for stage in part:
            stage.storage.makedirs(stage.name)
            stage.storage.clean_temporaries(stage.name)
            skipped = len(shards) - len(pending[stage.name])
            if skipped:
                self.say(f"[{stage.name}] {skipped} of {len(shards)} shards already complete, skipped")
        part = [stage for stage in part if pending[stage.name]]
        if not part:
            return {}
        if part[0].barrier and part[0].before_run_uses_cluster():
            self._close_pool()  # its Ray tasks need the CPUs that idle actors would hold
        self._prepare(part)
        if self.pool is None or not self.pool.holds([s.name for s in part]):
            self._close_pool()
            group = self._pool_group(part[0], shards)
            self._prepare([s for s in group if not s.barrier])  # a barrier's before_run waits for its turn
            n_pending = len({shard for stage in part for shard in pending[stage.name]})
            workers = _workers(part[0], n_pending)
            self.pool = StageActorPool(group, [s.name for s in part], workers,
                                       self.max_actor_deaths * workers, self.say, part[0].name)
        self.pool.label = "+".join(s.name for s in part)  # the stages in messages, as the pool outlives them
        # The phase line: the stages below share actors, and a shard goes through all of them.
        self.say(f"[stages] {'+'.join(s.name for s in part)}: "
                 f"{len({x for stage in part for x in pending[stage.name]})} shard(s) on "
                 f"{len(self.pool)} actor(s) of {_shape_text(part[0])}")
        try:
            return self._drive(part, shards, pending)
        finally:
            for stage in part:
                stage.after_run()
                self.prepared.discard(stage.name)

    def _prepare(self, stages: list[Stage]) -> None:
        for stage in stages:
            if stage.name not in self.prepared:
                stage.before_run()
                self.prepared.add(stage.name)

    def _drive(self, part: list[Stage], shards: list[str],
               pending: dict[str, list[str]]) -> dict[str, list[StageStats]]:
        pool = self.pool
        order = [stage.name for stage in part]
        pending_sets = {name: set(found) for name, found in pending.items()}
        todo = {shard: [n for n in order if shard in pending_sets[n]] for shard in shards}
        queue = deque(shard for shard in shards if todo[shard])  # O(shards) in the driver
        raised = dict.fromkeys(queue, 0)
        deaths = dict.fromkeys(queue, 0)
        done_stats: dict[str, list[StageStats]] = {name: [] for name in order}
        rows = dict.fromkeys(order, 0)
        errors: dict[str, tuple[str, str]] = {}  # shard -> (stage, error)
        start = last_event = time.perf_counter()
        finished = False
        try:
            while queue or pool.busy:
                while queue and pool.has_idle:
                    shard = queue.popleft()
                    pool.submit(shard, todo[shard], raised[shard] + deaths[shard])
                try:
                    event = pool.next_event(timeout=10.0)
                except ActorsCannotStart as err:
                    raise StageFailed(f"stage {pool.label}: {err}") from err
                if event is None:
                    if not pool.busy and time.perf_counter() - last_event > self.start_timeout:
                        res = part[0].resources
                        raise StageFailed(
                            f"stage {pool.label}: no actor could start within {self.start_timeout:.0f} s "
                            f"({len(queue)} shard(s) waiting); does the cluster have "
                            f"{res.num_cpus} CPU(s) and {res.num_gpus} GPU(s) free?")
                    continue
                last_event = time.perf_counter()
                shard = event.shard
                for name, found in event.stats.items():
                    item = StageStats.from_dict(found)
                    done_stats[name].append(item)
                    rows[name] += item.rows_in
                    todo[shard].remove(name)
                    elapsed = time.perf_counter() - start
                    self.say(f"[{name}] shard {shard} done: {len(done_stats[name])}/{len(pending[name])} "
                             f"shards, {rows[name]} rows, {rows[name] / max(elapsed, 1e-9):.1f} rows/s")
                if event.death is not None:
                    stage = todo[shard][0]
                    deaths[shard] += 1
                    if deaths[shard] >= self.max_actor_deaths:
                        errors[shard] = (stage, f"its actor died {deaths[shard]} times, last: {event.death}")
                    else:
                        self.say(f"[{stage}] actor died on shard {shard} ({_first_line(event.death)}); "
                                 f"retrying it on a new actor (death {deaths[shard]} of at most "
                                 f"{self.max_actor_deaths})")
                        queue.append(shard)
                elif event.error is not None:
                    if raised[shard] < self.max_retries:
                        raised[shard] += 1
                        self.say(f"[{event.stage}] shard {shard} raised, retrying it: {_first_line(event.error)}")
                        queue.append(shard)
                    else:
                        errors[shard] = (event.stage, event.error)
            finished = True
        finally:
            if not finished:
                self._close_pool(teardown=False)
        pool.release(order)  # these stages do not run again: free their models
        if errors:
            raise StageFailed(_failure_message(order, errors))
        return done_stats


def _failure_message(order: list[str], errors: dict[str, tuple[str, str]]) -> str:
    by_stage: dict[str, list[str]] = {}
    for shard, (stage, _) in errors.items():
        by_stage.setdefault(stage, []).append(shard)
    first_stage = min(by_stage, key=order.index)
    lines = [f"stage {stage}: {len(found)} shard(s) failed ({', '.join(sorted(found))})"
             for stage, found in sorted(by_stage.items(), key=lambda item: order.index(item[0]))]
    first = min(by_stage[first_stage])
    return (f"{'; '.join(lines)}; completed shards are kept, re-run the same command to retry."
            f"\nshard {first}: {errors[first][1]}")


def run_stage(stage: Stage, shards: list[str], progress: Callable[[str], None] | None = None,
              max_retries: int = 1, max_actor_deaths: int = 3,
              start_timeout: float = 900.0) -> list[StageStats]:
    """Run one `stage` over `shards` on Ray, skipping completed ones. Returns the new shards' stats.

    A shard is retried `max_retries` times after raising, and after its actor died until it has
    killed `max_actor_deaths` actors; past either bound it fails the stage (StageFailed, once the
    other shards are done). `start_timeout`: seconds shards may wait with no actor able to start.
    """
    with StageRunner([stage], progress, max_retries, max_actor_deaths, start_timeout) as runner:
        return runner.run([stage], shards)[stage.name]


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "no message"
