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
    # installs the project, as `ray start` does not ship code.
    # albumentations (imported by img2dataset) asks PyPI for a newer version at import time unless
    # told not to: on a cluster without internet that costs a timeout per worker.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False,
                  runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        # "local": a new instance, never the cluster a `ray start` on this machine left recorded
        # in /tmp/ray/ray_current_cluster (which ray.init() without an address would join).
        ray.init(address="local", num_cpus=num_cpus, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


class StageFailed(RuntimeError):
    """Some shards failed for good; completed shards are kept and a re-run retries only those."""


def _workers(stage: Stage, n_pending: int) -> int:
    res = stage.resources
    if res.concurrency is not None:
        workers = res.concurrency
    elif res.num_gpus > 0:
        workers = max(1, int(_cluster_gpus() // res.num_gpus))
    else:
        workers = max(1, int(_cluster_cpus() // max(res.num_cpus, 0.01)))
    return min(workers, n_pending)


def run_stage(stage: Stage, shards: list[str], progress: Callable[[str], None] | None = None,
              max_retries: int = 1, max_actor_deaths: int = 3,
              start_timeout: float = 900.0) -> list[StageStats]:
    """Run `stage` over `shards` on Ray, skipping completed ones. Returns the new shards' stats.

    A shard is retried `max_retries` times after raising, and after its actor died until it has
    killed `max_actor_deaths` actors; past either bound it fails the stage (StageFailed, once the
    other shards are done). `start_timeout`: seconds shards may wait with no actor able to start.
    """
    pending = [s for s in shards if not stage.is_done(s)]
    stage.storage.makedirs(stage.name)
    stage.storage.clean_temporaries(stage.name)
    skipped = len(shards) - len(pending)
    say = progress or (lambda msg: log.info(msg))
    if skipped:
        say(f"[{stage.name}] {skipped} of {len(shards)} shards already complete, skipped")
    if not pending:
        return []

    stage.before_run()
    workers = _workers(stage, len(pending))
    pool = StageActorPool(stage, workers, max_actor_deaths * workers, say)
    queue = deque(pending)  # O(shards) in the driver: names and two counters per shard
    raised = dict.fromkeys(pending, 0)
    deaths = dict.fromkeys(pending, 0)
    done_stats: list[StageStats] = []
    errors: dict[str, str] = {}
    start = last_event = time.perf_counter()
    rows = 0
    finished = False
    try:
        while queue or pool.busy:
            while queue and pool.has_idle:
                shard = queue.popleft()
                pool.submit(shard, raised[shard] + deaths[shard])
            try:
                event = pool.next_event(timeout=10.0)
            except ActorsCannotStart as err:
                raise StageFailed(f"stage {stage.name}: {err}") from err
            if event is None:
                if not pool.busy and time.perf_counter() - last_event > start_timeout:
                    raise StageFailed(
                        f"stage {stage.name}: no actor could start within {start_timeout:.0f} s "
                        f"({len(queue)} shard(s) waiting); does the cluster have "
                        f"{stage.resources.num_cpus} CPU(s) and {stage.resources.num_gpus} GPU(s) free?")
                continue
            last_event = time.perf_counter()
            shard = event.shard
            if event.stats is not None:
                item = StageStats.from_dict(event.stats)
                done_stats.append(item)
                rows += item.rows_in
                elapsed = time.perf_counter() - start
                say(f"[{stage.name}] shard {shard} done: {len(done_stats)}/{len(pending)} shards, "
                    f"{rows} rows, {rows / max(elapsed, 1e-9):.1f} rows/s")
            elif event.death is not None:
                deaths[shard] += 1
                if deaths[shard] >= max_actor_deaths:
                    errors[shard] = f"its actor died {deaths[shard]} times, last: {event.death}"
                else:
                    say(f"[{stage.name}] actor died on shard {shard} ({_first_line(event.death)}); "
                        f"retrying it on a new actor (death {deaths[shard]} of at most {max_actor_deaths})")
                    queue.append(shard)
            elif raised[shard] < max_retries:
                raised[shard] += 1
                say(f"[{stage.name}] shard {shard} raised, retrying it: {_first_line(event.error)}")
                queue.append(shard)
            else:
                errors[shard] = event.error
        finished = True
    finally:
        pool.close(teardown=finished)
    stage.after_run()
    if errors:
        first = min(errors)
        raise StageFailed(
            f"stage {stage.name}: {len(errors)} shard(s) failed ({', '.join(sorted(errors))}); "
            f"completed shards are kept, re-run the same command to retry.\nshard {first}: {errors[first]}"
        )
    return done_stats


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "no message"
