"""The stage runner on a real local Ray (2 CPUs): stages of one resource shape share actors and take
each shard through in turn, a barrier waits for every shard, later stages load in the background,
and resume, retries and failures stay per stage."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.ray_adapter import StageFailed, StageRunner, stage_segments
from pipeline.stage import Resources, Stage
from pipeline.stats import StageStats

SHARDS = [f"{i:05d}" for i in range(6)]


class TracedStage(Stage):
    """Records, per shard, the worker's pid and when run_shard started and ended; can sleep, raise
    on chosen attempts, or fail its setup."""

    def __init__(self, name: str, output: str, log: Path, resources: Resources | None = None,
                 sleep: float = 0.0, raises: dict[str, int] | None = None, setup_error: bool = False,
                 setup_sleep: float = 0.0):
        super().__init__(output, resources or Resources(num_cpus=1))
        self.name = name  # an instance attribute: several traced stages in one run
        self.log = str(log)
        self.sleep = sleep
        self.raises = raises or {}
        self.setup_error = setup_error
        self.setup_sleep = setup_sleep
        self.driver_calls: list[str] = []

    def _record(self, event: dict) -> None:
        with open(self.log, "a") as handle:
            handle.write(json.dumps({"stage": self.name, "pid": os.getpid(), **event}) + "\n")

    def setup(self) -> None:
        start = time.time()
        time.sleep(self.setup_sleep)
        if self.setup_error:
            raise OSError(f"model file missing for {self.name}")
        self._record({"event": "setup", "start": start, "end": time.time()})

    def before_run(self) -> None:
        done = [s for s in SHARDS if self.storage.exists(f"a/{s}.done")]
        self._record({"event": "before_run", "a_done": len(done)})

    def run_shard(self, shard: str) -> StageStats:
        start = time.time()
        attempts = Path(self.log).with_name(f"{self.name}-{shard}.attempts")
        attempt = int(attempts.read_text()) if attempts.exists() else 0
        attempts.write_text(str(attempt + 1))
        time.sleep(self.sleep)
        if attempt < self.raises.get(shard, 0):
            raise ValueError(f"bad row in {self.name} shard {shard}")
        self._record({"event": "shard", "shard": shard, "start": start, "end": time.time()})
        return StageStats(stage=self.name, rows_in=1, rows_out=1)


class BarrierStage(TracedStage):
    barrier = True


class ClusterBarrierStage(BarrierStage):
    """A barrier whose before_run runs a Ray task of 1 CPU, as the distributed dedup does."""

    def before_run_uses_cluster(self) -> bool:
        return True

    def before_run(self) -> None:
        import ray

        ray.get(ray.remote(num_cpus=1)(lambda: 1).remote(), timeout=120)
        super().before_run()


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def shard_events(log: Path, stage: str) -> list[dict]:
    return [e for e in events(log) if e["event"] == "shard" and e["stage"] == stage]


def run_all(stages: list[Stage], messages: list[str] | None = None) -> None:
    with StageRunner(stages, (messages if messages is not None else []).append) as runner:
        for segment in stage_segments(stages):
            runner.run(segment, SHARDS)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "trace" / "events.jsonl"


@pytest.fixture(autouse=True)
def _trace_folder(log: Path) -> None:
    log.parent.mkdir()


def test_stages_of_one_shape_share_actors_and_stream(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    a = TracedStage("a", out, log, sleep=0.3)
    b = TracedStage("b", out, log, sleep=0.3)
    messages: list[str] = []
    run_all([a, b], messages)
    a_runs, b_runs = shard_events(log, "a"), shard_events(log, "b")
    assert sorted(e["shard"] for e in a_runs) == sorted(e["shard"] for e in b_runs) == SHARDS
    # Same actors: b ran in the processes that ran a, and each shard's b right after its a there.
    assert {e["pid"] for e in b_runs} <= {e["pid"] for e in a_runs}
    a_of = {e["shard"]: e for e in a_runs}
    for run in b_runs:
        assert run["pid"] == a_of[run["shard"]]["pid"] and run["start"] >= a_of[run["shard"]]["end"]
    # No barrier: b had started on some shard before a finished its last one.
    assert min(e["start"] for e in b_runs) < max(e["end"] for e in a_runs)
    assert any(m.startswith("[stages] a+b: 6 shard(s) on 2 actor(s)") for m in messages)
    assert all(a.is_done(s) and b.is_done(s) for s in SHARDS)


def test_a_barrier_waits_for_every_shard_on_the_same_actors(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    stages = [TracedStage("a", out, log), BarrierStage("b", out, log), TracedStage("c", out, log)]
    assert [[s.name for s in seg] for seg in stage_segments(stages)] == [["a"], ["b", "c"]]
    run_all(stages)
    before = [e for e in events(log) if e["event"] == "before_run" and e["stage"] == "b"]
    assert [e["a_done"] for e in before] == [len(SHARDS)]
    first_b = min(e["start"] for e in shard_events(log, "b"))
    assert first_b >= max(e["end"] for e in shard_events(log, "a"))
    # The pool outlived the barrier: b and c ran in the processes that ran a.
    pids = {e["pid"] for e in shard_events(log, "a")}
    assert {e["pid"] for e in shard_events(log, "b") + shard_events(log, "c")} <= pids


def test_later_stages_set_up_in_the_background(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    stages = [TracedStage("a", out, log, sleep=0.4), BarrierStage("b", out, log, setup_sleep=1.0)]
    run_all(stages)
    setups = {e["pid"]: e for e in events(log) if e["event"] == "setup" and e["stage"] == "b"}
    a_runs = shard_events(log, "a")
    assert set(setups) == {e["pid"] for e in a_runs}
    # b's (slow) setup ran while its actor worked on a's shards, not after them.
    for pid, setup in setups.items():
        assert setup["start"] < max(e["end"] for e in a_runs if e["pid"] == pid)


def test_a_later_stage_whose_setup_fails_fails_the_run(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    stages = [TracedStage("a", out, log), BarrierStage("b", out, log, setup_error=True)]
    with pytest.raises(StageFailed, match=r"^stage b: a worker's setup of b failed: OSError: model file missing for b"):
        run_all(stages)
    assert len(shard_events(log, "a")) == len(SHARDS) and not shard_events(log, "b")


def test_another_shape_gets_its_own_pool_after_the_first(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    a = TracedStage("a", out, log, sleep=0.2)
    b = TracedStage("b", out, log, resources=Resources(num_cpus=2))
    messages: list[str] = []
    run_all([a, b], messages)
    a_runs, b_runs = shard_events(log, "a"), shard_events(log, "b")
    assert not {e["pid"] for e in b_runs} & {e["pid"] for e in a_runs}
    assert min(e["start"] for e in b_runs) >= max(e["end"] for e in a_runs)
    assert [m.split(":")[0] for m in messages if m.startswith("[stages]")] == ["[stages] a", "[stages] b"]


def test_a_retry_resumes_at_the_stage_that_raised(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    a, b = TracedStage("a", out, log), TracedStage("b", out, log, raises={"00002": 1})
    run_all([a, b])
    attempts = {p.name: int(p.read_text()) for p in log.parent.glob("*.attempts")}
    assert attempts["a-00002.attempts"] == 1 and attempts["b-00002.attempts"] == 2
    assert b.storage.read_json("b/00002_stats.json")["counters"] == {"retries": 1}
    assert a.storage.read_json("a/00002_stats.json").get("counters", {}) == {}


def test_a_failure_names_its_stage_and_keeps_the_rest(tmp_path, log, ray_session) -> None:
    out = str(tmp_path / "out")
    a, b = TracedStage("a", out, log), TracedStage("b", out, log, raises={"00004": 100})
    with pytest.raises(StageFailed, match=r"^stage b: 1 shard\(s\) failed \(00004\); completed shards are kept"):
        run_all([a, b])
    assert all(a.is_done(s) for s in SHARDS)
    assert [s for s in SHARDS if not b.is_done(s)] == ["00004"]
    # The same command again runs b on that shard only.
    b.raises = {}
    before = len(shard_events(log, "a"))
    run_all([a, b])
    assert len(shard_events(log, "a")) == before
    assert [e["shard"] for e in shard_events(log, "b")][-1] == "00004"


def test_a_barrier_that_needs_the_cluster_gets_the_cpus(tmp_path, log, ray_session) -> None:
    """The first pool's actors hold both CPUs; the barrier's Ray task would wait for ever if the
    pool were kept (ray.get's timeout turns that into a failure here)."""
    out = str(tmp_path / "out")
    stages = [TracedStage("a", out, log), ClusterBarrierStage("b", out, log)]
    run_all(stages)
    assert len(shard_events(log, "b")) == len(SHARDS)
    assert not {e["pid"] for e in shard_events(log, "b")} & {e["pid"] for e in shard_events(log, "a")}
