"""`filip build` on a Ray cluster of three nodes on this machine, one worker node removed in the
middle of the download stage: the build completes and its decisions and final shards equal a
single-node run's on the same input.

The build runs as a subprocess that joins the cluster with --ray-address (this process already
has the session's own Ray). Input and output live on the S3 test server, so nothing is shared
through local disk; the nodes and the build reach the server through the environment
(tests/s3_server.py). The workers import the project from the installed package.
"""
from __future__ import annotations

import io
import os
import queue
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.configtools import to_dict
from pipeline.storage import Storage
from tests.pipeline.conftest import make_config

# 7 shards of 8 rows: a stage outlasts a node's removal. The duplicate search runs on the cluster,
# reading the bucket (make_config sets single_machine_max_rows 0).
SETTINGS = {"unsafe": {"enabled": False}, "run": {"shard_size": 8}}
BUILD_TIMEOUT = 420


# The cluster lives in its own process: a Cluster object in the test process changes this process's
# Ray state (its node and session), and a later in-process Ray Data job then ended the session.
CLUSTER_SCRIPT = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes(timeout=60)
print(cluster.address, flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "remove":
        cluster.remove_node(workers[int(arg)])
        print("removed", flush=True)
    elif command == "quit":
        break
for node in list(cluster.worker_nodes):
    cluster.remove_node(node)
cluster.remove_node(cluster.head_node)
"""


class ClusterProcess:
    """A head and two worker nodes started by a child process, driven through its stdin."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.address = self._answer(timeout=180)

    def _answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the cluster process did not answer within {timeout} s")
        return line.strip()

    def remove_worker(self, index: int) -> None:
        self.process.stdin.write(f"remove {index}\n")
        self.process.stdin.flush()
        assert self._answer(timeout=120) == "removed"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def ray_cluster() -> Iterator[ClusterProcess]:
    """A head and two worker nodes of one CPU each: one actor of a stage per node."""
    # The cluster's address file and sockets go here, not in /tmp/ray: a plain ray.init() elsewhere
    # on this machine (other tests, other users) would otherwise join this cluster while it runs.
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths are limited to 107 bytes
    cluster = None
    try:
        cluster = ClusterProcess(dict(os.environ, RAY_TMPDIR=temp))
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(temp, ignore_errors=True)


def read_decisions(storage: Storage) -> list[dict]:
    """Every row's decision, from the per-shard `decisions/` folder."""
    table = pa.concat_tables([storage.read_parquet(rel) for rel in storage.glob("decisions/*.parquet")])
    return sorted(table.to_pylist(), key=lambda row: row["row_id"])


def shard_members(storage: Storage) -> dict[str, list[str]]:
    """The member names of each final shard (a key and an extension per file)."""
    members = {}
    for rel in storage.glob("shards/*.tar"):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(rel))) as archive:
            members[rel] = sorted(m.name for m in archive if m.isfile())
    return members


def start_build(config_path: Path, address: str, cwd: Path) -> tuple[subprocess.Popen, queue.Queue]:
    """`filip build` joining `address`, run away from the repository (the installed package is
    used); its output lines arrive on the returned queue, None at the end."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("PYTHONPATH", None)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(config_path),
                                "--ray-address", address], cwd=cwd, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return process, lines


def read_until(lines: queue.Queue, seen: list[str], needle: str | None, deadline: float) -> bool:
    """Move output lines to `seen` until one holds `needle` (True), the output ends or the
    deadline passes (False). `needle` None: read to the end."""
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            return False
        if line is None:
            return False
        seen.append(line)
        if needle is not None and needle in line:
            return True
    return False


@pytest.fixture
def single_node_run(s3_bucket: str, url_list, ray_session) -> tuple[str, str]:
    """The URL list uploaded to a fresh bucket, and a build of it on this process's one-node Ray:
    (input URL, bucket prefix); the build's output is under `<prefix>/single`."""
    from pipeline.build import build

    storage = Storage(s3_bucket)
    storage.write_bytes("input/urls.csv", Path(url_list[0]).read_bytes())
    input_url = storage.full_url("input/urls.csv")
    build(make_config(input_url, f"{s3_bucket}/single", **SETTINGS), progress=lambda message: None)
    return input_url, s3_bucket


def test_build_survives_a_node_removed_mid_stage(single_node_run, ray_cluster, tmp_path) -> None:
    input_url, bucket = single_node_run
    cluster = ray_cluster
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(make_config(input_url, f"{bucket}/multi", **SETTINGS))))
    process, lines = start_build(config_path, cluster.address, tmp_path)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT
        assert read_until(lines, seen, "[download] shard", deadline), "\n".join(seen[-40:])
        cluster.remove_worker(0)  # mid-stage: the other shards of the stage are in flight
        read_until(lines, seen, None, deadline)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait(timeout=30)
    output = "\n".join(seen)
    assert process.returncode == 0, output[-4000:]
    removed_at = next(i for i, line in enumerate(seen) if "[download] shard" in line)
    assert any("[download] shard" in line for line in seen[removed_at + 1:]), "removed after the stage"

    reference, multi = Storage(f"{bucket}/single"), Storage(f"{bucket}/multi")
    assert read_decisions(multi) == read_decisions(reference)
    assert shard_members(multi) == shard_members(reference) != {}
    # The node's download actor was lost: in the middle of a shard (almost always: 4 shards were
    # still queued), which is then retried and counted in the stage's stats, or while starting.
    stats = multi.read_json("stats.json")
    download = next(s for s in stats["stages"] if s["stage"] == "download")
    deaths = sum("[download] actor died on shard" in line for line in seen)
    start_deaths = sum("[download] an actor died while starting" in line for line in seen)
    assert deaths + start_deaths >= 1, output[-4000:]
    assert download["counters"].get("retries", 0) == deaths, output[-4000:]
