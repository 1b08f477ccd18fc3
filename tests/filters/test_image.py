"""inspect_image on real Flickr photos, truncated JPEGs and bodies that are not images."""
from __future__ import annotations

import hashlib

import imagehash
import pytest
from PIL import Image

from filters.image import ImageDecodeError, inspect_image, phash_to_signed, phash_to_unsigned


def _photos(flickr_dir, count: int = 5) -> list:
    return sorted((flickr_dir / "images").glob("*.jpg"))[:count]


def test_real_photos_give_sha256_phash_and_size(flickr_dir) -> None:
    for path in _photos(flickr_dir):
        data = path.read_bytes()
        info = inspect_image(data)
        with Image.open(path) as image:
            assert (info.width, info.height) == image.size
            expected_phash = int(str(imagehash.phash(image)), 16)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert phash_to_unsigned(info.phash) == expected_phash
        assert -(1 << 63) <= info.phash < (1 << 63)


@pytest.mark.parametrize("cut", [1, 2, 10, 500])
def test_truncated_jpeg_is_a_decode_error(flickr_dir, cut: int) -> None:
    data = _photos(flickr_dir, 1)[0].read_bytes()
    with pytest.raises(ImageDecodeError) as caught:
        inspect_image(data[:-cut])
    assert caught.value.reason == "decode_error"


def test_trailing_bytes_after_the_end_marker_are_accepted(flickr_dir) -> None:
    data = _photos(flickr_dir, 1)[0].read_bytes()
    assert inspect_image(data + b"\x00trailer").sha256 != inspect_image(data).sha256


@pytest.mark.parametrize("body", [b"", b"<html><body>404 not found</body></html>", b"\xff\xd8\xff\xe0garbage"])
def test_non_image_bodies_are_decode_errors(body: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        inspect_image(body)


def test_signed_phash_round_trip() -> None:
    for bits in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        assert phash_to_unsigned(phash_to_signed(bits)) == bits
    assert phash_to_signed((1 << 64) - 1) == -1
