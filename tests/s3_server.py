"""A real S3-compatible server on 127.0.0.1 for the tests: moto's standalone server, the one s3fs
tests itself against, in a thread of the test process.

The server is found through the environment, not through arguments, so the code under test runs as
a user's would: botocore (under s3fs and boto3) reads `AWS_ENDPOINT_URL_S3` whenever it makes a
client, in the test process, in a `filip` subprocess and in Ray workers. Workers get the environment
of the Ray instance they belong to when it starts, so `ray_session` (tests/conftest.py) starts this
server first and passes `S3Server.environment` to its workers.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

import pytest

# Fixed fake credentials: moto accepts any, and a real account's keys must never be used by a test.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
               # No instance-metadata lookups (a second's timeout each where there is no cloud).
               "AWS_EC2_METADATA_DISABLED": "true"}
# Variables that would send a test's requests elsewhere or sign them for a real account.
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_SHARED_CREDENTIALS_FILE",
           "AWS_CONFIG_FILE", "FSSPEC_S3_ENDPOINT_URL")


@dataclass
class S3Server:
    """The running server: its endpoint and the environment that makes s3fs and boto3 use it."""

    endpoint: str
    environment: dict[str, str] = field(default_factory=dict)

    def filesystem(self):
        """A fresh s3fs filesystem on the server (no listing cache: a test reads what others wrote)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def new_bucket(self) -> str:
        """A new, empty bucket: `s3://bucket-<n>/prefix` (the prefix itself does not exist yet)."""
        name = f"bucket-{next(_bucket_numbers)}"
        self.filesystem().mkdir(name)
        return f"s3://{name}/prefix"


# Bucket names must be unique on the server for the session (S3 names are 3-63 characters).
_bucket_numbers = itertools.count(1)


def _forget_cached_filesystems() -> None:
    # fsspec reuses filesystem instances; one made before the endpoint was set would keep the old one.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1, with the environment pointing at it for the
    whole session (restored afterwards)."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request to stderr; the tests read the build's stderr, not the server's.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    environment = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {key: os.environ.get(key) for key in [*environment, *CLEARED]}
    for key in CLEARED:
        os.environ.pop(key, None)
    os.environ.update(environment)
    _forget_cached_filesystems()
    try:
        yield S3Server(endpoint, environment)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_cached_filesystems()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket for one test: `s3://bucket-<n>/prefix`."""
    return s3_server.new_bucket()
