"""truncation_reason on real photos, generated JPEG/PNG/GIF/WebP files, cuts, thumbnails and junk."""
from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image

from filters.integrity import TRUNCATED, truncation_reason


def jpeg_bytes(width: int = 48, height: int = 32, **save_options: object) -> bytes:
    """A noisy RGB JPEG (noise keeps the entropy-coded data long and full of 0xFF bytes)."""
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **save_options)
    return buffer.getvalue()


def with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> tuple[bytes, int]:
    """Insert an APP1 EXIF segment holding ``thumbnail`` (IFD1 JPEGInterchangeFormat) after SOI.

    Returns the new file and the offset just past the thumbnail's own EOI.
    """
    ifd0 = struct.pack("<HI", 0, 14)  # no entries; IFD1 follows at offset 14
    thumbnail_offset = 14 + 2 + 2 * 12 + 4
    ifd1 = struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, thumbnail_offset)
    ifd1 += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumbnail
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    thumbnail_end = 2 + len(segment)
    return jpeg[:2] + segment + jpeg[2:], thumbnail_end


def png_bytes(width: int = 40, height: int = 30) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_real_photos_are_complete(flickr_dir) -> None:
    for path in sorted((flickr_dir / "images").glob("*.jpg"))[:50]:
        assert truncation_reason(path.read_bytes()) is None, path.name


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_blocks": 1}],
                         ids=["baseline", "progressive", "restart_markers"])
def test_jpeg_cut_anywhere_is_truncated(options: dict) -> None:
    data = jpeg_bytes(**options)
    assert truncation_reason(data) is None
    for cut in range(3, len(data)):
        assert truncation_reason(data[:cut]) == TRUNCATED, cut


def test_jpeg_missing_only_its_end_marker_is_truncated(flickr_dir) -> None:
    data = sorted((flickr_dir / "images").glob("*.jpg"))[0].read_bytes()
    assert truncation_reason(data[:-2]) == TRUNCATED
    assert truncation_reason(data[:-1]) == TRUNCATED


def test_exif_thumbnail_end_marker_does_not_count() -> None:
    data, thumbnail_end = with_exif_thumbnail(jpeg_bytes(64, 48), jpeg_bytes(16, 12))
    assert data[thumbnail_end - 2:thumbnail_end] == b"\xff\xd9"
    assert truncation_reason(data) is None
    for cut in range(3, len(data)):
        assert truncation_reason(data[:cut]) == TRUNCATED, cut


@pytest.mark.parametrize("trailer", [
    b"\x00" * 16,
    b"\r\n",
    b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40,  # motion photo: an MP4 after the JPEG
    b"\xff\xd8\xff\xe0 a second, cut picture",
    b"junk\xff\xdajunk\xff\xd9junk\xff",
], ids=["zeros", "newline", "mp4", "second_soi", "markers_in_junk"])
def test_bytes_after_the_end_marker_are_ignored(trailer: bytes) -> None:
    assert truncation_reason(jpeg_bytes() + trailer) is None


def test_large_junk_with_markers_after_the_end_is_ignored() -> None:
    junk = bytearray(np.random.default_rng(3).integers(0, 256, 100_000, np.uint8).tobytes())
    junk[100:102], junk[5000:5002], junk[-2:] = b"\xff\xda", b"\xff\xd9", b"\xff\xd9"
    assert truncation_reason(jpeg_bytes() + bytes(junk)) is None


def test_garbage_after_a_jpeg_signature_is_truncated() -> None:
    assert truncation_reason(b"\xff\xd8\xff\xe0garbage") == TRUNCATED
    assert truncation_reason(b"\xff\xd8\xff") == TRUNCATED


def test_png_walks_chunks_to_iend() -> None:
    data = png_bytes()
    assert truncation_reason(data) is None
    assert truncation_reason(data + b"trailing bytes after IEND") is None
    for cut in range(8, len(data)):
        assert truncation_reason(data[:cut]) == TRUNCATED, cut
    without_iend = data[:-12]
    assert truncation_reason(without_iend + b"\x00" * 40) == TRUNCATED


def test_gif_needs_its_trailer() -> None:
    buffer = io.BytesIO()
    Image.new("P", (8, 8), 3).save(buffer, "GIF")
    data = buffer.getvalue()
    assert truncation_reason(data) is None
    assert truncation_reason(data[:-1]) == TRUNCATED


def test_webp_needs_its_declared_length() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, "WEBP")
    data = buffer.getvalue()
    assert truncation_reason(data) is None
    assert truncation_reason(data[:-1]) == TRUNCATED


@pytest.mark.parametrize("body", [b"", b"<html><body>404</body></html>", b"BM\x00\x00"])
def test_unknown_formats_are_not_judged(body: bytes) -> None:
    assert truncation_reason(body) is None


def test_large_jpeg_is_checked_at_c_speed() -> None:
    data = jpeg_bytes(1600, 1200)  # ~2 MB of noise: a per-byte Python loop would take ~1 s
    assert len(data) > 1_000_000
    started = time.perf_counter()
    assert truncation_reason(data) is None
    assert truncation_reason(data[:-2]) == TRUNCATED
    assert time.perf_counter() - started < 0.1
