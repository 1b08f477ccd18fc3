"""Decode an image body once and derive the columns later stages reuse: sha256, pHash, size."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageFile

from filters.base import DECODE_ERROR
from filters.integrity import truncation_reason

# Truncated files must fail loudly; PIL would otherwise fill the missing part with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can fully decode (truncated, corrupt, or not an image)."""

    reason = DECODE_ERROR


@dataclass(frozen=True)
class ImageInfo:
    """What one decode of an image body tells us.

    ``phash`` is imagehash's 64-bit pHash read as a signed int64 (two's complement), so it fits an
    int64 column; ``phash_to_unsigned`` gives the bit pattern back.
    """

    sha256: str
    phash: int
    width: int
    height: int


def phash_to_signed(bits: int) -> int:
    """Reinterpret an unsigned 64-bit pattern as a signed int64."""
    return bits - (1 << 64) if bits >= (1 << 63) else bits


def phash_to_unsigned(value: int) -> int:
    """Inverse of :func:`phash_to_signed`."""
    return value & ((1 << 64) - 1)


def _hash_bits(hash_matrix: np.ndarray) -> int:
    # Same bit order as imagehash's hex string: the flattened bool matrix, most significant bit first.
    return int.from_bytes(np.packbits(hash_matrix.flatten()).tobytes(), "big")


def inspect_image(data: bytes) -> ImageInfo:
    """Fully decode ``data`` and return its sha256, pHash and pixel size.

    Raises :class:`ImageDecodeError` for a body cut before its format's end structure (see
    :func:`filters.integrity.truncation_reason`) and for anything PIL cannot decode to the last pixel.
    """
    if not data:
        raise ImageDecodeError("empty body")
    # The structural check is the download stage's rule too; it also catches what PIL forgives
    # (a JPEG missing only its last bytes) and costs nothing next to a decode.
    truncated = truncation_reason(data)
    if truncated is not None:
        raise ImageDecodeError(f"{truncated}: the bytes stop before the format's end structure")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # open() only reads the header; load() decodes every pixel and fails on truncation.
            image.load()
            width, height = image.size
            phash = imagehash.phash(image)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        phash=phash_to_signed(_hash_bits(phash.hash)),
        width=int(width),
        height=int(height),
    )
