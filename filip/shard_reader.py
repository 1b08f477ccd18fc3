"""The samples of one WebDataset tar shard, numbered and located, reading only what is asked for.

Members are grouped into samples as webdataset groups them: consecutive files with the same base
name (up to the first dot of the file name) form one sample keyed by it, and the lower-cased rest
of the name is the field. Samples are numbered in file order and located by the byte offset of
their first header, so a resumed loader seeks straight to a sample (a local shard) instead of
reading the shard, let alone the stream, up to it.
"""
from __future__ import annotations

import contextlib
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped
Located = tuple[int, int, int, dict[str, Any]]  # index, offset of its first header, offset after it, sample


def is_object_url(spec: str) -> bool:
    """A URL that fsspec opens (s3://, gs://, ...); local paths, http(s) and `pipe:` stay webdataset's."""
    scheme = spec.split("://", 1)[0] if "://" in spec else ""
    return bool(scheme) and scheme not in ("file", "http", "https")


@contextlib.contextmanager
def _open(url: str) -> Iterator[tuple[tarfile.TarFile, IO[bytes]]]:
    if is_object_url(url):
        import fsspec

        # An object store (s3://, gs://): fsspec's file seeks by ranged reads, so a resumed
        # loader reads the buffered samples, not the shard up to them.
        stream = fsspec.open(url, "rb").open()
    else:
        from webdataset.gopen import gopen  # a local path is open(); pipe:, http: ... as in webdataset

        stream = gopen(url)
    try:
        # A pipe can only be read through; a file is read by seeking from header to header.
        with tarfile.open(fileobj=stream, mode="r:" if stream.seekable() else "r|") as tar:
            yield tar, stream
    finally:
        stream.close()


def _members(tar: tarfile.TarFile, stream: IO[bytes], offset: int) -> Iterator[tarfile.TarInfo]:
    """The members from the header at `offset` on; their data is read only if the caller asks."""
    if not stream.seekable():
        for member in tar:
            tar.members = []  # no index of the whole shard in memory
            yield member
        return
    while True:
        stream.seek(offset)
        try:
            member = tarfile.TarInfo.fromtarfile(tar)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            return
        except tarfile.HeaderError as error:
            raise tarfile.ReadError(f"{error} at byte {offset}") from None
        offset = tar.offset  # fromtarfile leaves it at the next header
        yield member


def _samples(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo], url: str, first: int,
             wanted: Callable[[int], bool], last: int | None = None) -> Iterator[Located]:
    index, key, offset, sample, after = first - 1, None, 0, None, 0
    for member in members:
        match = _NAME.match(member.name) if member.isreg() and not _META.match(member.name) else None
        if match is None:
            continue
        prefix, field = match.group(1), match.group(2).lower()
        if prefix != key:
            if sample is not None:
                yield index, offset, member.offset, sample
            index, key, offset = index + 1, prefix, member.offset
            if last is not None and index > last:
                return
            sample = {"__key__": prefix, "__url__": url} if wanted(index) else None
        if sample is not None and field not in sample:
            sample[field] = tar.extractfile(member).read()  # type: ignore[union-attr]
        after = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if sample is not None:
        yield index, offset, after, sample


def iter_shard_samples(url: str, start: int = 0, offset: int = 0) -> Iterator[Located]:
    """(index, offset, after, sample) for the samples of shard `url` from index `start` on.

    A sample is ``{"__key__": ..., "__url__": url, field: bytes, ...}``; `after` is where the next
    sample starts, the `offset` to give for `start` = index + 1. With `offset` 0 the shard is
    scanned from its first header, skipping the data of samples before `start`. A read error (not
    a tar, truncated) propagates after the samples before it.
    """
    with _open(url) as (tar, stream):
        if offset and stream.seekable():
            yield from _samples(tar, _members(tar, stream, offset), url, start, lambda i: True)
        else:
            yield from _samples(tar, _members(tar, stream, 0), url, 0, lambda i: i >= start)


def fetch_shard_samples(url: str, wanted: dict[int, int]) -> dict[int, dict[str, Any]]:
    """The samples of shard `url` named `{index: offset}`, each read by seeking to its offset."""
    found: dict[int, dict[str, Any]] = {}
    with _open(url) as (tar, stream):
        if not stream.seekable():
            located = _samples(tar, _members(tar, stream, 0), url, 0, wanted.__contains__, max(wanted, default=-1))
            return {index: sample for index, _, _, sample in located}
        for index, offset in sorted(wanted.items(), key=lambda item: item[1]):
            for _, _, _, sample in _samples(tar, _members(tar, stream, offset), url, index, lambda i: True, index):
                found[index] = sample
    return found
