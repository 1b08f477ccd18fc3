"""A stage's Ray actors as the driver sees them: starting, idle, or busy with one shard.

Unlike `ray.util.ActorPool`, a dead actor does not end the run: `next_event` reports its death
with the shard it held, and the pool starts a replacement, placed by Ray wherever the cluster has
room. A new actor gets shards only once its setup() has finished, so a replacement that cannot be
placed (its node gone, the cluster full) never holds a shard hostage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.stage import Stage

RETRIES_COUNTER = "retries"


class ActorsCannotStart(RuntimeError):
    """setup() raised in a new actor (every other would do the same), or too many died starting."""


@dataclass
class ShardEvent:
    """A shard's attempt ended: `stats` (done), `error` (run_shard raised) or `death` (its actor died)."""

    shard: str
    stats: dict | None = None
    error: str | None = None
    death: str | None = None


def _actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)  # the pool replaces a dead actor itself, and the retry is counted
    class StageActor:
        def __init__(self, stage: Stage):
            self.stage = stage
            self.stage.setup()

        def run(self, shard: str, retries: int) -> tuple[dict | None, str | None]:
            try:
                stats = self.stage.run_shard(shard)
                if retries:  # in the shard's own counters: stats.json is merged from them
                    stats.counters[RETRIES_COUNTER] = stats.counters.get(RETRIES_COUNTER, 0) + retries
                self.stage.finish_shard(shard, stats)
                return stats.to_dict(), None
            except Exception as err:  # reported per shard; the run goes on with the others
                import traceback

                return None, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"

        def teardown(self) -> None:
            self.stage.teardown()

    return StageActor


class StageActorPool:
    """`workers` actors of `stage`, each running one shard at a time, dead ones replaced.

    `max_start_deaths`: actors that may die before their setup() finishes (a node lost while
    they start) before the pool gives up.
    """

    def __init__(self, stage: Stage, workers: int, max_start_deaths: int, say: Callable[[str], None]):
        self.stage = stage
        self.say = say
        self.max_start_deaths = max_start_deaths
        self.start_deaths = 0
        self._class = _actor_class().options(num_cpus=stage.resources.num_cpus,
                                             num_gpus=stage.resources.num_gpus)
        self._every: list = []  # every actor started, to stop at the end: workers plus one per death
        self._starting: dict = {}  # readiness ref -> actor whose setup() is still running
        self._idle: list = []
        self._busy: dict = {}  # result ref -> (actor, shard)
        for _ in range(workers):
            self._start_actor()

    def _start_actor(self) -> None:
        actor = self._class.remote(self.stage)
        self._every.append(actor)
        self._starting[actor.__ray_ready__.remote()] = actor

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    @property
    def busy(self) -> int:
        return len(self._busy)

    def submit(self, shard: str, retries: int) -> None:
        actor = self._idle.pop()
        self._busy[actor.run.remote(shard, retries)] = (actor, shard)

    def next_event(self, timeout: float) -> ShardEvent | None:
        """The next shard attempt to end, or None when `timeout` seconds pass without one."""
        import ray
        from ray.exceptions import RayActorError

        while True:
            ready, _ = ray.wait([*self._busy, *self._starting], num_returns=1, timeout=timeout)
            if not ready:
                return None
            ref = ready[0]
            if ref in self._starting:
                self._actor_started(ref)
                continue
            actor, shard = self._busy.pop(ref)
            try:
                stats, error = ray.get(ref)
            except RayActorError as err:
                ray.kill(actor)  # already dead, or unreachable: either way not used again
                self._start_actor()
                return ShardEvent(shard, death=str(err))
            self._idle.append(actor)
            return ShardEvent(shard, stats=stats, error=error)

    def _actor_started(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError

        actor = self._starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as err:
            if err.actor_init_failed:
                raise ActorsCannotStart(f"a worker's setup failed: {last_line(err)}\n{err}") from err
            self.start_deaths += 1
            if self.start_deaths >= self.max_start_deaths:
                raise ActorsCannotStart(
                    f"{self.start_deaths} actors died while starting, last: {err}") from err
            self.say(f"[{self.stage.name}] an actor died while starting, starting another: "
                     f"{str(err).strip().splitlines()[0]}")
            self._start_actor()
            return
        self._idle.append(actor)

    def close(self, teardown: bool) -> None:
        """teardown() in the idle actors when asked, then stop every actor this pool started."""
        import ray

        try:
            if teardown:
                ray.get([actor.teardown.remote() for actor in self._idle])
        finally:
            for actor in self._every:
                ray.kill(actor)


def last_line(error: object) -> str:
    """The exception line at the end of a remote traceback ("OSError: model file missing")."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
