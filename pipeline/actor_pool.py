"""A pool of Ray actors as the driver sees them: starting, idle, or busy with one shard.

An actor holds several stages that share a resource shape (`pipeline/ray_adapter.py` groups
them) and runs a shard through as many of them as the driver asks, one after the other in the same
process: a shard goes on to the next stage as soon as the stage before has finished it, with no
barrier and no new worker. Each stage still writes its own outputs and `.done` marker per shard, so
resume is per stage as before.

setup() of the stages the pool runs first happens in the actor's constructor (a failure there is
Ray's "actor init failed": the pool gives up at once, as every actor would fail alike). The later
stages' setup() (NudeNet, MarianMT) runs on a background thread while the first stages work, so
their models are loaded by the time their shards arrive; a failure there is reported the same way
when that stage is first asked for.

Unlike `ray.util.ActorPool`, a dead actor does not end the run: `next_event` reports its death
with the shard it held, and the pool starts a replacement, placed by Ray wherever the cluster has
room. A new actor gets shards only once its first setup() has finished, so a replacement that cannot
be placed (its node gone, the cluster full) never holds a shard hostage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.stage import Stage

RETRIES_COUNTER = "retries"


class ActorsCannotStart(RuntimeError):
    """setup() raised in a new actor (every other would do the same), or too many died starting."""


@dataclass
class ShardEvent:
    """A shard's attempt ended. `stats`: the stages it completed, by name (all asked, unless it
    failed); then either nothing more, or `error` and `stage` (that stage's run_shard raised), or
    `death` (the actor died under the shard)."""

    shard: str
    stats: dict[str, dict] = field(default_factory=dict)
    error: str | None = None
    stage: str | None = None
    death: str | None = None


def _actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)  # the pool replaces a dead actor itself, and the retry is counted
    class StageActor:
        def __init__(self, stages: list[Stage], set_up_first: list[str]):
            import threading

            self.stages = {stage.name: stage for stage in stages}
            self.ready = {name: threading.Event() for name in self.stages}
            self.setup_errors: dict[str, str] = {}
            for name in set_up_first:
                self.stages[name].setup()
                self.ready[name].set()
            later = [stage for stage in stages if stage.name not in set_up_first]
            if later:  # a daemon: an actor killed mid-load must not wait for it
                threading.Thread(target=self._set_up, args=(later,), daemon=True,
                                 name="setup-later-stages").start()

        def _set_up(self, stages: list[Stage]) -> None:
            import traceback

            for stage in stages:
                try:
                    stage.setup()
                except BaseException as err:  # noqa: BLE001 - reported when the stage is asked for
                    self.setup_errors[stage.name] = (
                        f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
                finally:
                    self.ready[stage.name].set()

        def run(self, shard: str, names: list[str], retries: int) -> tuple[dict, str | None, str | None, bool]:
            """Run `shard` through the stages `names`, in order: (stats by stage, error, the stage
            that failed, whether it failed in setup())."""
            import traceback

            done: dict[str, dict] = {}
            for name in names:
                stage = self.stages[name]
                self.ready[name].wait()
                if name in self.setup_errors:
                    return done, self.setup_errors[name], name, True
                try:
                    stats = stage.run_shard(shard)
                    if retries and not done:  # in the shard's own counters: stats.json is merged from them
                        stats.counters[RETRIES_COUNTER] = stats.counters.get(RETRIES_COUNTER, 0) + retries
                    stage.finish_shard(shard, stats)
                except Exception as err:  # reported per shard; the run goes on with the others
                    return done, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}", name, False
                done[name] = stats.to_dict()
            return done, None, None, False

        def teardown(self, names: list[str]) -> None:
            for name in names:
                self.ready[name].wait()
                if name not in self.setup_errors:
                    self.stages[name].teardown()

    return StageActor


class StageActorPool:
    """`workers` actors, each holding `stages` and running one shard at a time, dead ones replaced.

    `set_up_first`: the stages whose setup() runs before an actor takes shards (the others load in
    the background). `max_start_deaths`: actors that may die before their first setup() finishes
    (a node lost while they start) before the pool gives up. `label`: the name in messages.
    """

    def __init__(self, stages: list[Stage], set_up_first: list[str], workers: int, max_start_deaths: int,
                 say: Callable[[str], None], label: str):
        self.stages = stages
        self.set_up_first = list(set_up_first)
        self.say = say
        self.label = label
        self.max_start_deaths = max_start_deaths
        self.start_deaths = 0
        resources = stages[0].resources
        self._class = _actor_class().options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
        self._every: list = []  # every actor started, to stop at the end: workers plus one per death
        self._starting: dict = {}  # readiness ref -> actor whose first setup() is still running
        self._idle: list = []
        self._busy: dict = {}  # result ref -> (actor, shard)
        self.torn_down: set[str] = set()
        for _ in range(workers):
            self._start_actor()

    def _start_actor(self) -> None:
        actor = self._class.remote(self.stages, self.set_up_first)
        self._every.append(actor)
        self._starting[actor.__ray_ready__.remote()] = actor

    def __len__(self) -> int:
        """Actors the pool runs (started or starting)."""
        return len(self._idle) + len(self._busy) + len(self._starting)

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    @property
    def busy(self) -> int:
        return len(self._busy)

    def holds(self, names: list[str]) -> bool:
        return set(names) <= {stage.name for stage in self.stages} - self.torn_down

    def submit(self, shard: str, names: list[str], retries: int) -> None:
        actor = self._idle.pop()
        self._busy[actor.run.remote(shard, names, retries)] = (actor, shard)

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
                stats, error, stage, in_setup = ray.get(ref)
            except RayActorError as err:
                ray.kill(actor)  # already dead, or unreachable: either way not used again
                self._start_actor()
                return ShardEvent(shard, death=str(err))
            if in_setup:
                raise ActorsCannotStart(f"a worker's setup of {stage} failed: {error.strip().splitlines()[0]}"
                                        f"\n{error}")
            self._idle.append(actor)
            return ShardEvent(shard, stats=stats, error=error, stage=stage)

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
            self.say(f"[{self.label}] an actor died while starting, starting another: "
                     f"{str(err).strip().splitlines()[0]}")
            self._start_actor()
            return
        self._idle.append(actor)

    def release(self, names: list[str]) -> None:
        """teardown() of stages that will not run again, in the idle actors: frees their models
        while the pool goes on with later stages."""
        import ray

        names = [n for n in names if n not in self.torn_down]
        if names and self._idle:
            ray.get([actor.teardown.remote(names) for actor in self._idle])
        self.torn_down.update(names)

    def close(self, teardown: bool) -> None:
        """teardown() in the idle actors when asked, then stop every actor this pool started."""
        import ray

        try:
            if teardown:
                self.release([stage.name for stage in self.stages])
        finally:
            for actor in self._every:
                ray.kill(actor)


def last_line(error: object) -> str:
    """The exception line at the end of a remote traceback ("OSError: model file missing")."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
