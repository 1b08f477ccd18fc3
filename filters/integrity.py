"""Cheap structural checks on downloaded image bytes, before any decoding.

Decoders are lenient: OpenCV returns a picture for a JPEG that stops half-way and fills the rest
with grey, and PIL accepts a JPEG that lost its last bytes. A web crawl has many such files
(connections cut mid-transfer), and they must not become training samples. Each format has a
structure a complete file closes; walking it is a reliable, nearly free test. Download and inspect
both use this one rule.
"""
from __future__ import annotations

import re
import struct

TRUNCATED = "truncated_image"

_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA
# TEM and RST0-7 are bare two-byte markers; every other marker carries a 2-byte length.
_JPEG_BARE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
# Between segments: the next 0xFF followed by a marker byte. Like libjpeg, bytes that are not a
# marker (a sloppy encoder's padding) are skipped rather than failing the file. Fill bytes need no
# rule: in FF FF D9 the search fails at the first FF and matches at the second.
_SEGMENT_MARKER = re.compile(rb"\xff([\x01-\xfe])")
# Inside entropy-coded data 0xFF 0x00 is a stuffed data byte and RST0-7 belong to the scan, so the
# scan ends at the first 0xFF followed by anything else. A pattern starting with one literal byte
# lets the regex engine skip ahead at memchr speed (with "\xff+" it is ~15x slower).
_SCAN_END_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_reaches_end(data: bytes) -> bool:
    """Walk the marker structure from SOI; complete iff an EOI is reached at top level.

    Segments are skipped by their length, so an EXIF thumbnail's EOI inside APP1 never counts,
    and bytes after the top-level EOI (motion-photo video, junk) are never looked at.
    """
    size = len(data)
    position = 2  # after SOI
    while True:
        found = _SEGMENT_MARKER.search(data, position)
        if found is None:
            return False
        marker = found.group(1)[0]
        position = found.end()
        if marker == _JPEG_EOI:
            return True
        if marker in _JPEG_BARE_MARKERS:
            continue
        if position + 2 > size:
            return False
        length = int.from_bytes(data[position:position + 2], "big")
        if length < 2:
            return False
        position += length
        if position > size:
            return False
        if marker == _JPEG_SOS:
            scan_end = _SCAN_END_MARKER.search(data, position)
            if scan_end is None:
                return False
            position = scan_end.start()


def _png_reaches_end(data: bytes) -> bool:
    """Walk the chunks by their lengths; complete iff the whole IEND chunk (with CRC) is present."""
    size = len(data)
    position = len(_PNG_SIGNATURE)
    while position + 12 <= size:
        length, kind = struct.unpack_from(">I4s", data, position)
        position += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return position <= size
    return False


def truncation_reason(data: bytes) -> str | None:
    """`truncated_image` when the bytes are a known image format cut before its end, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return None if _jpeg_reaches_end(data) else TRUNCATED
    if data[:8] == _PNG_SIGNATURE:
        return None if _png_reaches_end(data) else TRUNCATED
    if data[:6] in (b"GIF87a", b"GIF89a"):  # GIF: the trailer byte
        return None if data.rstrip(b"\x00").endswith(b";") else TRUNCATED
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 12:
        declared = struct.unpack("<I", data[4:8])[0] + 8
        return None if len(data) >= declared else TRUNCATED
    return None
