"""encode_for_training on generated files and real photos: pixels, orientation, modes, sizes, refusals."""
from __future__ import annotations

import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from filters.web.image_encode import EncodedImage, EncodeSettings, ImageRefused, encode_for_training
from tests.filters.test_integrity import jpeg_bytes, with_exif_thumbnail

LOSSLESS = EncodeSettings(resize_mode="no", encode_format="png", encode_quality=1)
QUADRANT_COLOURS = ((220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 30))  # TL, TR, BL, BR


def _save(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _stored_pixels(result: EncodedImage) -> np.ndarray:
    """The stored image as cv2 reads it unchanged, converted to RGB; asserts it has 3 channels."""
    pixels = cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels.shape == (result.height, result.width, 3)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def _quadrants(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    half_h, half_w = height // 2, width // 2
    pixels[:half_h, :half_w], pixels[:half_h, half_w:] = QUADRANT_COLOURS[0], QUADRANT_COLOURS[1]
    pixels[half_h:, :half_w], pixels[half_h:, half_w:] = QUADRANT_COLOURS[2], QUADRANT_COLOURS[3]
    return Image.fromarray(pixels)


def _quadrant_means(pixels: np.ndarray) -> list[np.ndarray]:
    rows, cols = pixels.shape[:2]
    r, c = rows // 4, cols // 4  # the middle of each quadrant, away from edges blurred by resizing
    centres = ((r, c), (r, 3 * c), (3 * r, c), (3 * r, 3 * c))
    return [pixels[y - r // 2:y + r // 2, x - c // 2:x + c // 2].reshape(-1, 3).mean(0) for y, x in centres]


# The transpose that stores an upright picture so that EXIF orientation N shows it upright again.
_STORE_FOR_ORIENTATION = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("size", [(400, 300), (2400, 1800)], ids=["full_decode", "draft_decode"])
@pytest.mark.parametrize("orientation", sorted(_STORE_FOR_ORIENTATION))
def test_exif_orientation_gives_the_upright_picture(orientation: int, size: tuple[int, int]) -> None:
    upright = _quadrants(*size)
    method = _STORE_FOR_ORIENTATION[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = _save(stored, "JPEG", quality=95, exif=exif.tobytes())
    result = encode_for_training(body, EncodeSettings())
    assert (result.original_width, result.original_height) == size
    assert (result.width, result.height) == (341, 256)
    for mean, colour in zip(_quadrant_means(_stored_pixels(result)), QUADRANT_COLOURS):
        assert np.abs(mean - colour).max() < 8, (mean, colour)


def test_sixteen_bit_grey_png_is_scaled_to_eight_bits() -> None:
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16)
    values = np.tile(gradient, (16, 1))
    values[0, :3] = (0, 32768, 65535)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    result = encode_for_training(_save(image, "PNG"), LOSSLESS)
    pixels = _stored_pixels(result).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0] - values / 257).max() <= 1
    assert list(pixels[0, :3, 0]) == [0, 128, 255]


def test_sixteen_bit_rgb_png_is_scaled_to_eight_bits() -> None:
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[...] = (65535, 32768, 1028)
    rgb[4:] = (0, 12850, 51400)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # Pillow cannot write it
    assert ok
    pixels = _stored_pixels(encode_for_training(encoded.tobytes(), LOSSLESS)).astype(int)
    assert np.abs(pixels[0, 0] - (255, 128, 4)).max() <= 1
    assert np.abs(pixels[7, 7] - (0, 50, 200)).max() <= 1


@pytest.mark.parametrize("dtype", [np.int32, np.float32], ids=["mode_I", "mode_F"])
def test_int_and_float_samples_use_the_sixteen_bit_range(dtype: type) -> None:
    values = np.array([[-500, 0, 257 * 10, 32768, 65535, 90000]], dtype)
    image = Image.fromarray(values)
    assert image.mode in ("I", "F")
    pixels = _stored_pixels(encode_for_training(_save(image, "TIFF"), LOSSLESS))
    assert list(pixels[0, :, 0]) == [0, 0, 10, 128, 255, 255]


def test_greyscale_jpeg_is_stored_with_three_channels() -> None:
    grey = Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1)))
    result = encode_for_training(_save(grey, "JPEG", quality=95), EncodeSettings(resize_mode="no"))
    pixels = _stored_pixels(result).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2
    assert np.abs(pixels[..., 0] - np.asarray(grey)).mean() < 2


def _half_transparent(mode: str) -> bytes:
    """64x32, left half transparent (with a colour that must not show), right half opaque black."""
    if mode == "P":
        indices = np.zeros((32, 64), np.uint8)
        indices[:, 32:] = 1
        image = Image.fromarray(indices, "P")
        image.putpalette([200, 0, 0, 0, 0, 0])
        return _save(image, "GIF", transparency=0)
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, :32] = (200, 0, 0, 0)
    rgba[:, 32:] = (0, 0, 0, 255)
    return _save(Image.fromarray(rgba).convert(mode), "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode: str) -> None:
    pixels = _stored_pixels(encode_for_training(_half_transparent(mode), LOSSLESS))
    assert (pixels[:, :32] == 255).all()
    assert (pixels[:, 32:] == 0).all()


@pytest.mark.parametrize("mode, colour, expected", [
    ("1", 1, (255, 255, 255)), ("L", 90, (90, 90, 90)), ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("YCbCr", (76, 85, 255), (254, 0, 0)),
])
def test_other_modes_become_rgb(mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    image_format = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    body = _save(Image.new(mode, (24, 16), colour), image_format, quality=100)
    pixels = _stored_pixels(encode_for_training(body, LOSSLESS)).astype(int)
    assert np.abs(pixels.reshape(-1, 3).mean(0) - expected).max() < 4


@pytest.mark.parametrize("image_format", ["GIF", "PNG"], ids=["gif", "apng"])
def test_multi_frame_images_keep_the_first_frame(image_format: str) -> None:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    body = _save(frames[0], image_format, save_all=True, append_images=frames[1:], duration=100)
    pixels = _stored_pixels(encode_for_training(body, LOSSLESS)).astype(int)
    assert np.abs(pixels.reshape(-1, 3).mean(0) - (255, 0, 0)).max() < 3


def test_trailing_junk_is_ignored_and_pixels_unchanged(flickr_dir) -> None:
    body = sorted((flickr_dir / "images").glob("*.jpg"))[0].read_bytes()
    junk = bytearray(np.random.default_rng(5).integers(0, 256, 100_000, np.uint8).tobytes())
    junk[10:12], junk[50_000:50_002], junk[-2:] = b"\xff\xd9", b"\xff\xda", b"\xff\xd9"
    settings = EncodeSettings(encode_format="png", encode_quality=1)
    clean, with_junk = encode_for_training(body, settings), encode_for_training(body + bytes(junk), settings)
    assert np.array_equal(_stored_pixels(clean), _stored_pixels(with_junk))


def _refusal(body: bytes, settings: EncodeSettings = EncodeSettings()) -> ImageRefused:
    with pytest.raises(ImageRefused) as caught:
        encode_for_training(body, settings)
    return caught.value


def test_jpeg_missing_its_last_two_bytes_is_truncated(flickr_dir) -> None:
    body = sorted((flickr_dir / "images").glob("*.jpg"))[0].read_bytes()
    assert _refusal(body[:-2]).reason == "truncated_image"


def test_jpeg_cut_after_its_exif_thumbnail_is_truncated() -> None:
    body, thumbnail_end = with_exif_thumbnail(jpeg_bytes(320, 240), jpeg_bytes(32, 24))
    assert encode_for_training(body, EncodeSettings()).original_width == 320
    assert _refusal(body[:thumbnail_end]).reason == "truncated_image"
    assert _refusal(body[:thumbnail_end + 200]).reason == "truncated_image"


@pytest.mark.parametrize("body", [
    b"",
    b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    b"P6\n2 2\n255\n" + bytes(12),  # a real PPM, but not a web format we open
    b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 0, b"IEND") + b"\xaeB`\x82",  # structure, no pixels
], ids=["empty", "html", "ppm", "png_without_header"])
def test_bodies_that_are_not_images(body: bytes) -> None:
    refusal = _refusal(body)
    assert refusal.reason == "not_an_image"
    assert str(refusal) == f"not_an_image: {refusal.detail}"


def _giant_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG built chunk by chunk, so the test never holds its pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
    rows_per_block = 400
    stream = b"".join(compressor.compress(row * rows_per_block) for _ in range(height // rows_per_block))
    stream += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def test_pixel_bomb_is_refused_from_the_header_quickly() -> None:
    body = _giant_png()
    started = time.perf_counter()
    refusal = _refusal(body)
    assert time.perf_counter() - started < 0.5
    assert refusal.reason == "too_many_pixels"


def test_max_pixels_is_checked_before_decoding() -> None:
    body = _save(Image.new("RGB", (101, 100)), "PNG")
    assert _refusal(body, EncodeSettings(max_pixels=10_000)).reason == "too_many_pixels"
    assert encode_for_training(body, EncodeSettings(max_pixels=10_100)).original_width == 101


LANDSCAPE_SIZES = {  # 600x400 source, image_size 256
    "no": (600, 400), "keep_ratio": (384, 256), "keep_ratio_largest": (256, 171),
    "center_crop": (256, 256), "border": (256, 256),
}


@pytest.mark.parametrize("scale", [1, 4], ids=["600x400", "2400x1600"])
@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
@pytest.mark.parametrize("mode", sorted(LANDSCAPE_SIZES))
def test_resize_modes_give_img2dataset_sizes(mode: str, portrait: bool, scale: int) -> None:
    width, height = 600 * scale, 400 * scale
    expected = LANDSCAPE_SIZES[mode] if scale == 1 or mode != "no" else (width, height)
    if portrait:
        width, height, expected = height, width, expected[::-1]
    body = jpeg_bytes(width, height)
    result = encode_for_training(body, EncodeSettings(resize_mode=mode))
    assert (result.width, result.height) == expected
    assert (result.original_width, result.original_height) == (width, height)
    assert _stored_pixels(result).shape == (expected[1], expected[0], 3)


def test_border_pads_with_white() -> None:
    body = _save(Image.new("RGB", (600, 400), (0, 0, 0)), "PNG")
    pixels = _stored_pixels(encode_for_training(body, EncodeSettings(resize_mode="border", encode_format="png",
                                                                     encode_quality=1)))
    assert (pixels[:42] == 255).all() and (pixels[-43:] == 255).all()  # 256 - 171 = 85 rows of border
    assert (pixels[42:-43] == 0).all()


@pytest.mark.parametrize("mode, expected", [
    ("no", (100, 50)), ("keep_ratio", (512, 256)), ("keep_ratio_largest", (256, 128)),
    ("center_crop", (256, 256)), ("border", (256, 256)),
])
def test_small_images_upscale_only_when_asked(mode: str, expected: tuple[int, int]) -> None:
    body = _save(_quadrants(100, 50), "PNG")
    kept = encode_for_training(body, EncodeSettings(resize_mode=mode))
    assert (kept.width, kept.height) == (100, 50)
    grown = encode_for_training(body, EncodeSettings(resize_mode=mode, resize_only_if_bigger=False))
    assert (grown.width, grown.height) == expected


@pytest.mark.parametrize("mode, source", [("center_crop", (256, 400)), ("border", (100, 256))])
def test_governing_side_equal_to_image_size_is_still_squared(mode: str, source: tuple[int, int]) -> None:
    # img2dataset skips the crop/pad when no resize happened; every stored image here is square.
    result = encode_for_training(_save(Image.new("RGB", source), "PNG"), EncodeSettings(resize_mode=mode))
    assert (result.width, result.height) == (256, 256)


@pytest.mark.parametrize("encode_format, magic", [("jpg", b"\xff\xd8\xff"), ("png", b"\x89PNG"), ("webp", b"RIFF")])
def test_encode_formats(encode_format: str, magic: bytes) -> None:
    quality = 3 if encode_format == "png" else 90
    result = encode_for_training(jpeg_bytes(600, 400), EncodeSettings(encode_format=encode_format,
                                                                       encode_quality=quality))
    assert result.data.startswith(magic)
    assert Image.open(io.BytesIO(result.data)).size == (result.width, result.height) == (384, 256)


def test_reduced_jpeg_decode_matches_a_full_decode(flickr_dir) -> None:
    for path in sorted((flickr_dir / "images").glob("*.jpg"))[:10]:
        with Image.open(path) as photo:
            web_size = photo.convert("RGB").resize((1024, round(1024 * photo.height / photo.width)),
                                                   Image.Resampling.LANCZOS)
        body = _save(web_size, "JPEG", quality=92)
        result = encode_for_training(body, EncodeSettings(encode_format="png", encode_quality=1))
        full = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        reference = cv2.resize(full, (result.width, result.height), interpolation=cv2.INTER_AREA)
        assert np.abs(_stored_pixels(result).astype(int) - reference).mean() < 2.0, path.name


@pytest.mark.parametrize("field, value", [
    ("resize_mode", "stretch"), ("encode_format", "gif"), ("image_size", 0), ("max_pixels", 0),
])
def test_invalid_settings_fail_loudly(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        EncodeSettings(**{field: value})
    with pytest.raises(ValueError):
        EncodeSettings(encode_format="png", encode_quality=95)
