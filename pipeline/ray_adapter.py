"""The one adapter between the Ray-free stage contract and Ray.

Each stage runs as a pool of Ray actors (setup() once per actor, so a model loads once per worker);
shards are handed to idle actors by Ray's ActorPool. A shard whose `.done` marker exists is skipped,
which is what makes a re-run after a crash resume where it stopped.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from pipeline.stage import Stage
from pipeline.stats import StageStats

log = logging.getLogger(__name__)


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
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


class StageFailed(RuntimeError):
    """Some shards raised; completed shards are kept and a re-run retries only the failed ones."""


def run_stage(stage: Stage, shards: list[str], progress: Callable[[str], None] | None = None,
              max_retries: int = 1) -> list[StageStats]:
    """Run `stage` over `shards` on Ray, skipping completed ones. Returns the new shards' stats."""
    import ray
    from ray.util import ActorPool

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
    res = stage.resources
    if res.concurrency is not None:
        workers = res.concurrency
    elif res.num_gpus > 0:
        workers = max(1, int(_cluster_gpus() // res.num_gpus))
    else:
        workers = max(1, int(_cluster_cpus() // max(res.num_cpus, 0.01)))
    workers = min(workers, len(pending))

    @ray.remote
    class StageActor:
        def __init__(self, stage: Stage):
            self.stage = stage
            self.stage.setup()

        def run(self, shard: str) -> tuple[str, dict | None, str | None]:
            try:
                stats = self.stage.run_shard(shard)
                self.stage.finish_shard(shard, stats)
                return shard, stats.to_dict(), None
            except Exception as err:  # reported per shard; the run goes on with the others
                import traceback

                return shard, None, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"

        def teardown(self) -> None:
            self.stage.teardown()

    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    actors = [StageActor.options(**options).remote(stage) for _ in range(workers)]
    pool = ActorPool(actors)
    done_stats: list[StageStats] = []
    errors: dict[str, str] = {}
    attempts = {s: 0 for s in pending}
    start = time.perf_counter()
    rows = 0
    queue = list(pending)
    while queue:
        for shard, stats, error in pool.map_unordered(lambda actor, s: actor.run.remote(s), queue):
            attempts[shard] += 1
            if error is None:
                item = StageStats.from_dict(stats)
                done_stats.append(item)
                errors.pop(shard, None)
                rows += item.rows_in
                elapsed = time.perf_counter() - start
                say(f"[{stage.name}] shard {shard} done: {len(done_stats)}/{len(pending)} shards, "
                    f"{rows} rows, {rows / max(elapsed, 1e-9):.1f} rows/s")
            else:
                errors[shard] = error
        queue = [s for s in errors if attempts[s] <= max_retries]
        if queue:
            say(f"[{stage.name}] retrying {len(queue)} failed shard(s)")
    ray.get([a.teardown.remote() for a in actors])
    for actor in actors:
        ray.kill(actor)
    stage.after_run()
    if errors:
        first = next(iter(errors.items()))
        raise StageFailed(
            f"stage {stage.name}: {len(errors)} shard(s) failed ({', '.join(sorted(errors))}); "
            f"completed shards are kept, re-run the same command to retry.\nshard {first[0]}: {first[1]}"
        )
    return done_stats
