"""A synthetic run whose stages have finished, for tests and benchmarks of what comes after them
(decisions, final shards) at sizes no web could serve here.

Row i of the input gets an outcome from its index alone: refused at input when i % 50 == 7
(`unsupported_scheme`, every fifth of those an input duplicate of row i - 1), failed to download
when i % 10 == 3 (`http_404`), dropped by inspect when i % 10 == 5 (`too_small`), kept otherwise.
The download tars hold real image files: one small JPEG per row, the same picture with the row id
appended after its end marker (decoders stop there), so every image's bytes are distinct.
"""
from __future__ import annotations

import io
import tarfile

import pyarrow as pa

from pipeline.stage import DROP_KIND, DROP_REASON, shard_name
from pipeline.storage import Storage

STAGES = ["download", "inspect"]
KEY_INDEX_DIGITS = 4


def outcome(row_id: int) -> tuple[str, str | None, str | None]:
    """(status, stage, reason) that the decisions must record for input row `row_id`."""
    if row_id % 50 == 7:
        return "dropped", "input", "duplicate_row" if row_id % 250 == 7 else "unsupported_scheme"
    if row_id % 10 == 3:
        return "failed_download", "download", "http_404"
    if row_id % 10 == 5:
        return "dropped", "inspect", "too_small"
    return "kept", "inspect", None


def _jpeg(side: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 40)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_shard(storage: Storage, shard: int, ids: list[int], picture: bytes) -> int:
    """The input, download and inspect files of one shard; returns its kept rows."""
    name = shard_name(shard)
    keys = [f"{name}{i:0{KEY_INDEX_DIGITS}d}" for i in range(len(ids))]
    urls = [f"https://example.com/{i}.jpg" for i in ids]
    captions = [f"a photo numbered {i}" for i in ids]
    storage.write_parquet(f"input/{name}.parquet", pa.table({"row_id": pa.array(ids, pa.int64()),
                                                            "url": urls, "caption": captions}))
    failed = [outcome(i)[0] == "failed_download" for i in ids]
    storage.write_parquet(f"download/{name}.parquet", pa.table({
        "row_id": pa.array(ids, pa.int64()), "url": urls, "caption": captions, "key": keys,
        "status": ["failed_to_download" if f else "success" for f in failed],
        "error_message": ["http_404: not found" if f else None for f in failed]}))
    offsets, sizes = {}, {}
    with storage.atomic_open(f"download/{name}.tar", "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for key, row_id, fail in zip(keys, ids, failed):
                if fail:
                    continue
                data = picture + str(row_id).encode()
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                # A USTAR header of a short name is one block; the data follows it.
                offsets[key], sizes[key] = archive.offset + tarfile.BLOCKSIZE, len(data)
                archive.addfile(info, io.BytesIO(data))
    ok = [(k, i, c, u) for k, i, c, u, f in zip(keys, ids, captions, urls, failed) if not f]
    reasons = [outcome(i)[2] if outcome(i)[1] == "inspect" else None for _, i, _, _ in ok]
    storage.write_parquet(f"inspect/{name}.parquet", pa.table({
        "row_id": pa.array([o[1] for o in ok], pa.int64()), "url": [o[3] for o in ok],
        "caption": [o[2] for o in ok], "key": [o[0] for o in ok],
        "tar_offset": pa.array([offsets[o[0]] for o in ok], pa.int64()),
        "tar_size": pa.array([sizes[o[0]] for o in ok], pa.int64()),
        DROP_REASON: pa.array(reasons, pa.string()),
        DROP_KIND: pa.array(["dropped" if r else None for r in reasons], pa.string())}))
    return sum(r is None for r in reasons)


def write_fake_run(output: str, rows: int, shard_size: int, rejected_part_rows: int = 1_000_000) -> dict[str, int]:
    """Write the input, download and inspect files of `rows` input rows; returns kept rows per shard."""
    storage = Storage(output)
    picture = _jpeg()
    kept: dict[str, int] = {}
    rejected: list[int] = []
    batch: list[int] = []

    def flush_rejected() -> None:
        part = len(storage.glob("input/rejected/*.parquet"))
        storage.write_parquet(f"input/rejected/{part:05d}.parquet", pa.table({
            "row_id": pa.array(rejected, pa.int64()), "url": [f"ftp://example.com/{i}.jpg" for i in rejected],
            "caption": [f"a photo numbered {i}" for i in rejected],
            DROP_REASON: [outcome(i)[2] for i in rejected],
            "duplicate_of_row": pa.array([i - 1 if outcome(i)[2] == "duplicate_row" else None for i in rejected],
                                         pa.int64())}))
        rejected.clear()

    for row_id in range(rows):
        if outcome(row_id)[1] == "input":
            rejected.append(row_id)
            if len(rejected) == rejected_part_rows:
                flush_rejected()
            continue
        batch.append(row_id)
        if len(batch) == shard_size:
            kept[shard_name(len(kept))] = _write_shard(storage, len(kept), batch, picture)
            batch = []
    if batch:
        kept[shard_name(len(kept))] = _write_shard(storage, len(kept), batch, picture)
    if rejected:
        flush_rejected()
    return kept
