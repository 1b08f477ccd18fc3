"""The stage runner on a real local Ray: shards that raise, actors that die under a shard (a hard
`os._exit`, as an out-of-memory kill or a segfault in a native library looks to Ray), setups that
fail, and the priority of the workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.build import shard_stats
from pipeline.ray_adapter import StageFailed, run_stage
from pipeline.stage import Resources, Stage
from pipeline.stats import StageStats, merge_all

REPO = Path(__file__).resolve().parents[2]
SHARDS = ["00000", "00001", "00002", "00003"]
ROWS = 5  # rows each shard reports


class FaultyStage(Stage):
    """Counts its attempts per shard in marker files, and exits hard (or raises) on the first
    `exits` (or `raises`) attempts of a shard."""

    name = "faulty"

    def __init__(self, output: str, markers: Path, exits: dict[str, int] | None = None,
                 raises: dict[str, int] | None = None, setup_error: bool = False, setup_exit: str = ""):
        super().__init__(output, Resources(num_cpus=1, concurrency=2))
        self.markers = str(markers)
        self.exits = exits or {}
        self.raises = raises or {}
        self.setup_error = setup_error
        self.setup_exit = setup_exit  # "first": the first actor to start exits hard; "always": all do

    def setup(self) -> None:
        if self.setup_error:
            raise OSError("model file missing: /nowhere/model.onnx")
        if self.setup_exit == "always":
            os._exit(1)
        if self.setup_exit == "first":
            try:  # exclusive creation: of the actors starting together, exactly one exits
                os.close(os.open(Path(self.markers) / "setup.first", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)

    def run_shard(self, shard: str) -> StageStats:
        marker = Path(self.markers) / f"{shard}.attempts"
        attempt = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(attempt + 1))  # before dying: the next attempt must see this one
        if attempt < self.exits.get(shard, 0):
            os._exit(1)
        if attempt < self.raises.get(shard, 0):
            raise ValueError(f"bad row in shard {shard}")
        self.storage.write_text(f"{self.name}/{shard}.txt", shard)
        return StageStats(stage=self.name, rows_in=ROWS, rows_out=ROWS)


def attempts(markers: Path) -> dict[str, int]:
    return {p.name.split(".")[0]: int(p.read_text()) for p in sorted(markers.glob("*.attempts"))}


@pytest.fixture
def run_dirs(tmp_path: Path) -> tuple[str, Path]:
    markers = tmp_path / "markers"
    markers.mkdir()
    return str(tmp_path / "out"), markers


def test_a_dead_actor_is_replaced_and_its_shard_retried(run_dirs, ray_session) -> None:
    out, markers = run_dirs
    stage = FaultyStage(out, markers, exits={"00001": 1})
    messages: list[str] = []
    stats = run_stage(stage, SHARDS, messages.append)
    assert sorted(s.rows_in for s in stats) == [ROWS] * 4
    assert all(stage.is_done(s) for s in SHARDS)
    assert attempts(markers) == {"00000": 1, "00001": 2, "00002": 1, "00003": 1}
    # The retry is in the shard's own counters on disk, so stats.json (merged from disk) has it.
    per_shard = shard_stats(stage.storage, stage.name, SHARDS)
    assert {s: dict(item.counters) for s, item in per_shard.items()} == {
        "00000": {}, "00001": {"retries": 1}, "00002": {}, "00003": {}}
    merged = merge_all(stage.name, per_shard.values())
    assert merged.counters == {"retries": 1} and merged.rows_out == 4 * ROWS
    assert sum("actor died on shard 00001" in m for m in messages) == 1


def test_a_shard_that_always_kills_its_actor_fails_the_stage(run_dirs, ray_session) -> None:
    out, markers = run_dirs
    stage = FaultyStage(out, markers, exits={"00002": 100})
    with pytest.raises(StageFailed) as failure:
        run_stage(stage, SHARDS, lambda message: None, max_actor_deaths=3)
    message = str(failure.value)
    assert message.startswith("stage faulty: 1 shard(s) failed (00002); completed shards are kept")
    assert "shard 00002: its actor died 3 times, last: " in message
    assert attempts(markers) == {"00000": 1, "00001": 1, "00002": 3, "00003": 1}
    assert [s for s in SHARDS if stage.is_done(s)] == ["00000", "00001", "00003"]


def test_a_shard_that_raises_is_retried_once(run_dirs, ray_session) -> None:
    out, markers = run_dirs
    stage = FaultyStage(out, markers, raises={"00000": 1, "00003": 100})
    with pytest.raises(StageFailed) as failure:
        run_stage(stage, SHARDS, lambda message: None)
    message = str(failure.value)
    assert message.startswith("stage faulty: 1 shard(s) failed (00003)")
    assert "shard 00003: ValueError: bad row in shard 00003" in message
    assert attempts(markers) == {"00000": 2, "00001": 1, "00002": 1, "00003": 2}
    per_shard = shard_stats(stage.storage, stage.name, SHARDS)
    assert sorted(per_shard) == ["00000", "00001", "00002"]
    assert dict(per_shard["00000"].counters) == {"retries": 1}
    # A re-run retries only the failed shard; it raises no more (its bound has passed).
    stage.raises = {}
    assert [s.rows_in for s in run_stage(stage, SHARDS, lambda message: None)] == [ROWS]
    assert attempts(markers)["00003"] == 3


def test_a_setup_that_raises_fails_the_stage_at_once(run_dirs, ray_session) -> None:
    out, markers = run_dirs
    expected = r"^stage faulty: a worker's setup failed: OSError: model file missing: /nowhere/model.onnx\n"
    with pytest.raises(StageFailed, match=expected):
        run_stage(FaultyStage(out, markers, setup_error=True), SHARDS, lambda message: None)
    assert attempts(markers) == {}


def test_an_actor_lost_while_starting_is_replaced(run_dirs, ray_session) -> None:
    out, markers = run_dirs
    stage = FaultyStage(out, markers, setup_exit="first")
    messages: list[str] = []
    assert len(run_stage(stage, SHARDS, messages.append)) == 4
    assert sum("[faulty] an actor died while starting" in m for m in messages) == 1
    assert attempts(markers) == dict.fromkeys(SHARDS, 1)
    assert merge_all(stage.name, shard_stats(stage.storage, stage.name, SHARDS).values()).counters == {}


def test_actors_that_always_die_starting_fail_the_stage(run_dirs, ray_session) -> None:
    out, markers = run_dirs
    with pytest.raises(StageFailed, match=r"^stage faulty: 4 actors died while starting, last: "):
        run_stage(FaultyStage(out, markers, setup_exit="always"), SHARDS, lambda message: None,
                  max_actor_deaths=2)  # 2 per worker, 2 workers
    assert attempts(markers) == {}


NICENESS_PROBE = textwrap.dedent("""
    import json, os
    from pipeline.ray_adapter import init_ray, run_stage
    from pipeline.stage import Resources, Stage
    from pipeline.stats import StageStats

    class NicenessStage(Stage):
        name = "niceness"

        def run_shard(self, shard):
            return StageStats(stage=self.name, counters={"nice": os.nice(0)})

    init_ray(num_cpus=1)
    stats = run_stage(NicenessStage(os.environ["PROBE_OUTPUT"], Resources(num_cpus=1)), ["00000"])
    print(json.dumps({"driver": os.nice(0), "worker": stats[0].counters["nice"]}))
""")


def test_local_ray_workers_run_at_the_drivers_priority(tmp_path: Path) -> None:
    # A driver of its own (this process's Ray is already started), itself at nice +3: without the
    # setting its workers would run at 3 + 15.
    env = {**os.environ, "PROBE_OUTPUT": str(tmp_path / "out"), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", NICENESS_PROBE], cwd=REPO, env=env, timeout=180,
                          capture_output=True, text=True, check=False, preexec_fn=lambda: os.nice(3))
    assert done.returncode == 0, done.stderr[-3000:]
    driver_nice = os.nice(0) + 3
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"driver": driver_nice, "worker": driver_nice}
