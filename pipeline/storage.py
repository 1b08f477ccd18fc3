"""Output storage on any fsspec filesystem (local disk, S3, GCS) with atomic writes.

A file is written under a temporary name in its final folder and then moved into place, so a
reader never sees a partial file under the final name. On object stores the move is a copy and a
delete; correctness there rests on the `.done` marker, which is written only after the outputs.
"""
from __future__ import annotations

import io
import json
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

# The package fsspec needs for each object store, named in the error when it is missing.
FILESYSTEM_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                       "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub"}


class StorageError(UserError):
    """A path that cannot be used: an object store without its package, a folder that cannot be written."""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for `url`; a missing filesystem package is the user's to install."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    # No listing cache on object stores: workers and the driver write and read the same folders,
    # and a listing cached before another process wrote a `.done` marker would hide it.
    options = {} if protocol in ("file", "local") else {"use_listings_cache": False}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError:
        package = FILESYSTEM_PACKAGES.get(protocol, f"the fsspec filesystem for {protocol}://")
        raise StorageError(f"{url}: install {package} to use {protocol}:// paths") from None
    except ValueError as err:  # fsspec's "Protocol not known"
        raise StorageError(f"{url}: {err}") from None


def arrow_filesystem(urls: list[str]) -> tuple[Any, list[str]]:
    """pyarrow's filesystem for `urls` (all on one filesystem) and the paths to give it, for
    `pyarrow.dataset.dataset(paths, filesystem=...)` and `ray.data.read_parquet`: given a list of
    `s3://` URLs without a filesystem, pyarrow refuses them. Object stores are reached through
    fsspec, so pyarrow uses the endpoint, credentials and options every other reader here uses.
    Local paths get None: pyarrow's own local filesystem."""
    if not urls:
        return None, []
    fs, _ = url_to_fs(urls[0])
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None, list(urls)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths = []
    for url in urls:
        other, path = url_to_fs(url)
        if type(other) is not type(fs):
            raise StorageError(f"{url}: not on the filesystem of {urls[0]}; one read spans one filesystem")
        paths.append(path)
    return PyFileSystem(FSSpecHandler(fs)), paths


class Storage:
    """The output folder of a run. Paths given to methods are relative to it."""

    def __init__(self, root: str):
        self.fs, path = url_to_fs(root)
        self.root = path.rstrip("/")
        self.url = root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def full_url(self, rel: str) -> str:
        """A path another process or library can open (keeps the protocol for object stores)."""
        return self.fs.unstrip_protocol(self.path(rel)) if not self.is_local else self.path(rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def check_writable(self) -> None:
        """Create the folder and write a file in it, so that a path that is a file, or a folder
        this user may not write, is refused before any work instead of at the first output."""
        try:
            self.makedirs("")
            self.write_bytes(".write-check", b"")
            self.remove(".write-check")
        except OSError as err:
            reason = "it is a file" if self.fs.isfile(self.root) else err.strerror or str(err)
            raise StorageError(f"{self.url}: cannot write the output folder here ({reason})") from None

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern`, sorted."""
        prefix = self.root + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.glob(self.path(pattern)))

    def remove(self, rel: str, recursive: bool = False) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=recursive)

    def _tmp_name(self, rel: str) -> str:
        folder, _, name = rel.rpartition("/")
        tmp = f".tmp-{uuid.uuid4().hex[:8]}-{name}"
        return f"{folder}/{tmp}" if folder else tmp

    def move(self, src_rel: str, dst_rel: str) -> None:
        self.fs.mv(self.path(src_rel), self.path(dst_rel))

    @contextmanager
    def atomic_open(self, rel: str, mode: str = "wb") -> Iterator[Any]:
        """Write to a temporary sibling and move it to `rel` when the block ends without error."""
        folder = rel.rpartition("/")[0]
        if folder:
            self.makedirs(folder)
        tmp = self._tmp_name(rel)
        try:
            with self.fs.open(self.path(tmp), mode) as handle:
                yield handle
            self.move(tmp, rel)
        except BaseException:
            self.remove(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_open(rel, "wb") as handle:
            handle.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as handle:
            return json.load(handle)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as handle:
            return handle.read()

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(rel, buffer.getvalue())

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def clean_temporaries(self, folder: str) -> int:
        """Remove temporaries left by a killed writer; returns how many."""
        leftovers = self.glob(f"{folder}/.tmp-*")
        for rel in leftovers:
            self.remove(rel, recursive=True)
        return len(leftovers)


def write_file_atomically(url: str, data: bytes) -> None:
    """Write one file (a local path or a URL) under a temporary name beside it, then move it into
    place: a reader, or a run killed half way, never leaves a partial file under `url`."""
    fs, path = url_to_fs(url)
    folder, _, name = path.rpartition("/")
    try:
        Storage(fs.unstrip_protocol(folder or ".")).write_bytes(name, data)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise StorageError(f"{url}: cannot write ({reason})") from None
