"""Session-wide fixtures: one local Ray instance for the whole test session, paths to shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FILIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
FLICKR_DIR = SHARED_DATA / "flickr8k-1k"
CIFAR_DIR = SHARED_DATA / "cifar10-test-1k"

# The S3 server fixtures (`s3_server`, `s3_bucket`), for every test folder.
pytest_plugins = ["tests.s3_server"]


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    if not (FLICKR_DIR / "captions.csv").exists():
        pytest.skip(f"shared data not found at {FLICKR_DIR} (set FILIP_SHARED_DATA)")
    return FLICKR_DIR


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not CIFAR_DIR.is_dir():
        pytest.skip(f"shared data not found at {CIFAR_DIR} (set FILIP_SHARED_DATA)")
    return CIFAR_DIR


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance shared by every test that needs Ray (starting Ray costs seconds).
    The S3 server starts first: workers keep the environment of the instance's start, and must
    reach it (`s3_server.environment` is its endpoint and test credentials)."""
    import ray

    from pipeline.ray_adapter import LOCAL_SYSTEM_CONFIG

    if not ray.is_initialized():
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # "local": never a cluster another process recorded in /tmp/ray; workers at this process's
    # priority (LOCAL_SYSTEM_CONFIG), as `filip build` runs its own local instance.
    ray.init(address="local", _system_config=LOCAL_SYSTEM_CONFIG, num_cpus=2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", **s3_server.environment}})
    yield ray
    # Left running until the interpreter exits: other session-scoped users may still need it.
