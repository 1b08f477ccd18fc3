"""Reading stage shards and the image bytes that img2dataset wrote, by key."""
from __future__ import annotations

import tarfile

import pyarrow as pa

from pipeline.schema import DROP_KIND, DROP_REASON
from pipeline.storage import Storage

IMAGE_EXTENSIONS = ("jpg", "png", "webp")


def read_stage_shard(storage: Storage, stage: str, shard: str) -> pa.Table:
    rel = f"{stage}/{shard}.parquet"
    if not storage.exists(rel):
        raise FileNotFoundError(f"{storage.full_url(rel)}: input shard of stage {stage} is missing")
    return storage.read_parquet(rel)


def read_tar_images(storage: Storage, shard: str) -> dict[str, tuple[bytes, int, int]]:
    """key -> (image bytes, offset of the bytes in the tar, their size) for `download/<shard>.tar`."""
    found: dict[str, tuple[bytes, int, int]] = {}
    with storage.fs.open(storage.path(f"download/{shard}.tar"), "rb") as handle:
        with tarfile.open(fileobj=handle, mode="r|") as archive:
            for member in archive:
                key, _, ext = member.name.rpartition(".")
                if ext in IMAGE_EXTENSIONS and member.isfile():
                    data = archive.extractfile(member).read()
                    found[key] = (data, member.offset_data, member.size)
    return found


def read_tar_index(storage: Storage, shard: str) -> dict[str, tuple[int, int]]:
    """key -> (offset of the image bytes in `download/<shard>.tar`, their size), from the members'
    headers only: the reader seeks over the data."""
    found: dict[str, tuple[int, int]] = {}
    with storage.fs.open(storage.path(f"download/{shard}.tar"), "rb") as handle:
        with tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                key, _, ext = member.name.rpartition(".")
                if ext in IMAGE_EXTENSIONS and member.isfile():
                    found[key] = (member.offset_data, member.size)
    return found


def read_image_at(storage: Storage, shard: str, offset: int, size: int) -> bytes:
    """One image by its position in `download/<shard>.tar` (a ranged read on object stores)."""
    with storage.fs.open(storage.path(f"download/{shard}.tar"), "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def attach_images(storage: Storage, shard: str, rows: pa.Table) -> pa.Table:
    """Add `image` (bytes) and `tar_offset`/`tar_size`; a key with no image in the tar gets null."""
    images = read_tar_images(storage, shard)
    keys = rows["key"].to_pylist()
    picked = [images.get(key) for key in keys]
    rows = rows.drop_columns([c for c in ("image", "tar_offset", "tar_size") if c in rows.column_names])
    rows = rows.append_column("image", pa.array([p[0] if p else None for p in picked], pa.binary()))
    rows = rows.append_column("tar_offset", pa.array([p[1] if p else None for p in picked], pa.int64()))
    return rows.append_column("tar_size", pa.array([p[2] if p else None for p in picked], pa.int64()))


def thumbnail(data: bytes | None, size: int = 128) -> bytes | None:
    """A small JPEG of an image for the report's gallery; None when it cannot be decoded."""
    import io

    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
            return out.getvalue()
    except Exception:  # a truncated or corrupt file is exactly what the gallery may show
        return None


def finalize_decisions(table: pa.Table) -> pa.Table:
    """Make sure `drop_reason` and `drop_kind` exist as strings (`dropped` where a reason is set)."""
    n = table.num_rows
    if DROP_REASON not in table.column_names:
        table = table.append_column(DROP_REASON, pa.nulls(n, pa.string()))
    reasons = table[DROP_REASON].to_pylist()
    if DROP_KIND in table.column_names:
        kinds = table[DROP_KIND].to_pylist()
        kinds = [None if r is None else (k or "dropped") for r, k in zip(reasons, kinds)]
        table = table.drop_columns([DROP_KIND])
    else:
        kinds = [None if r is None else "dropped" for r in reasons]
    table = table.set_column(table.schema.get_field_index(DROP_REASON), DROP_REASON,
                             pa.array(reasons, pa.string()))
    return table.append_column(DROP_KIND, pa.array(kinds, pa.string()))
