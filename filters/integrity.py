"""Cheap structural checks on downloaded image bytes, before any decoding.

Decoders are lenient: OpenCV (which img2dataset uses) returns a picture for a JPEG that stops
half-way and fills the rest with grey. A web crawl has many such files (connections cut
mid-transfer), and they must not become training samples. Each format has an end marker that a
complete file carries; its absence is a reliable, nearly free test.
"""
from __future__ import annotations

import struct

TRUNCATED = "truncated_image"


def truncation_reason(data: bytes) -> str | None:
    """`truncated_image` when the bytes are a known image format cut before its end, else None."""
    if data[:3] == b"\xff\xd8\xff":  # JPEG: ends with the EOI marker (allow trailing padding)
        return None if data.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9") else TRUNCATED
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: the IEND chunk and its CRC close the file
        return None if b"IEND" in data[-32:] else TRUNCATED
    if data[:6] in (b"GIF87a", b"GIF89a"):  # GIF: the trailer byte
        return None if data.rstrip(b"\x00").endswith(b";") else TRUNCATED
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 12:
        declared = struct.unpack("<I", data[4:8])[0] + 8
        return None if len(data) >= declared else TRUNCATED
    return None
