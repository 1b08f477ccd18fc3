"""Turn a downloaded body into the stored training image: upright, 8-bit RGB, resized, re-encoded.

img2dataset's cv2 path ignores EXIF orientation, writes 16-bit images as garbage and decodes
before any size check. Here Pillow reads the header first (a pixel bomb is refused before a byte of
it is decoded), decodes big JPEGs at a reduced DCT scale, and OpenCV does img2dataset's resize and
encode so the stored bytes keep its look. No Ray here: the download stage calls this per body.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from PIL import Image, ImageOps

from filters.integrity import truncation_reason

NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
RESIZE_ERROR = "resize_error"

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
# Web image formats only: Pillow's other openers include decoders no crawl needs (EPS even runs
# Ghostscript), and each is attack surface.
_OPEN_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255)
# A JPEG is decoded at no less than this multiple of the target size (Pillow's thumbnail() uses the
# same reducing_gap). With 2, a 256 px target gets a reduced decode only from 1024 px sources up.
_DRAFT_MARGIN = 2.0


@dataclass(frozen=True)
class EncodeSettings:
    """How the stored image is sized and encoded; the fields mean what img2dataset's options do."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95  # jpg/webp quality; png compression level 0-9
    max_pixels: int = 40_000_000  # width*height from the header, checked before decoding

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {ENCODE_FORMATS}, got {self.encode_format!r}")
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ValueError(f"png encode_quality is a compression level 0-9, got {self.encode_quality}")
        if self.image_size < 1 or self.max_pixels < 1:
            raise ValueError("image_size and max_pixels must be positive")


@dataclass(frozen=True)
class EncodedImage:
    """The stored image (3-channel RGB in the settings' format) and the sizes around it.

    ``original_width``/``original_height`` are the source's as it looks, after EXIF orientation.
    """

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


class ImageRefused(ValueError):
    """The body does not become a training image; ``reason`` is the statistics key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@functools.cache
def _cv2() -> ModuleType:
    import cv2

    # Download workers run one image per thread; OpenCV's own pool would oversubscribe the cores.
    cv2.setNumThreads(1)
    return cv2


def _target_size(width: int, height: int, settings: EncodeSettings) -> tuple[int, int] | None:
    """img2dataset's resized (width, height) for an upright source, or None when it keeps the size."""
    if settings.resize_mode == "no":
        return None
    by_shorter = settings.resize_mode in ("keep_ratio", "center_crop")
    governing = min(width, height) if by_shorter else max(width, height)
    if settings.resize_only_if_bigger and governing <= settings.image_size:
        return None
    scale = settings.image_size / governing
    # Same rounding as albumentations' SmallestMaxSize/LongestMaxSize, which img2dataset calls.
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(body: bytes, settings: EncodeSettings) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(body), formats=_OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRefused(TOO_MANY_PIXELS, str(error)) from error
    except Exception as error:  # PIL signals "not mine" with many types (UnidentifiedImageError, SyntaxError...)
        raise ImageRefused(NOT_AN_IMAGE, f"{type(error).__name__}: {error}") from error
    width, height = image.size
    if width * height > settings.max_pixels:
        raise ImageRefused(TOO_MANY_PIXELS, f"{width}x{height} exceeds {settings.max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageRefused(NOT_AN_IMAGE, f"empty canvas {width}x{height}")
    return image


def _decode_upright(image: Image.Image, settings: EncodeSettings) -> tuple[Image.Image, int, int]:
    """Decode the first frame and apply EXIF orientation; returns it with the upright header size."""
    width, height = image.size
    target = _target_size(width, height, settings)  # the scale does not depend on orientation
    if image.format in ("JPEG", "MPO") and target is not None and target[0] < width:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for the asking; keeping >= 2x the target leaves
        # the final area resize in charge of the look.
        factor = min(1.0, _DRAFT_MARGIN * target[0] / width)
        image.draft("RGB", (max(1, int(width * factor)), max(1, int(height * factor))))
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRefused(TOO_MANY_PIXELS, str(error)) from error
    except Exception as error:
        raise ImageRefused(NOT_AN_IMAGE, f"undecodable: {type(error).__name__}: {error}") from error
    loaded_size = image.size
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when already upright
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost an intact picture
        pass
    if image.size != loaded_size:
        width, height = height, width
    return image, width, height


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    """The image as an 8-bit (h, w, 3) RGB array; transparency composited over white."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16-bit (and int/float) samples: map the 16-bit range onto 8 bits, as 65535 -> 255.
        grey = np.asarray(image).astype(np.float32) / 257.0
        grey = np.rint(np.clip(grey, 0, 255)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = (mode in _ALPHA_MODES or "transparency" in image.info
                 or (mode == "P" and image.palette is not None and image.palette.mode == "RGBA"))
    if has_alpha:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _resize(pixels: np.ndarray, width: int, height: int, settings: EncodeSettings) -> np.ndarray:
    """img2dataset's resize, crop and border on upright pixels whose source size is width x height."""
    cv2 = _cv2()
    target = _target_size(width, height, settings)
    if target is not None and target != (pixels.shape[1], pixels.shape[0]):
        downscale = target[0] < width or target[1] < height
        interpolation = cv2.INTER_AREA if downscale else cv2.INTER_LANCZOS4
        pixels = cv2.resize(pixels, target, interpolation=interpolation)
    rows, cols = pixels.shape[:2]
    size = settings.image_size
    # img2dataset crops or pads only after resizing, so an image whose governing side already
    # equals image_size escaped it; here it is squared like every resized image.
    if settings.resize_mode == "center_crop" and min(rows, cols) == size:
        top, left = (rows - size) // 2, (cols - size) // 2
        pixels = pixels[top:top + size, left:left + size]
    elif settings.resize_mode == "border" and max(rows, cols) == size:
        top, left = (size - rows) // 2, (size - cols) // 2
        pixels = cv2.copyMakeBorder(pixels, top, size - rows - top, left, size - cols - left,
                                    cv2.BORDER_CONSTANT, value=_WHITE)
    return pixels


def _encode(pixels: np.ndarray, settings: EncodeSettings) -> bytes:
    cv2 = _cv2()
    flag = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION,
            "webp": cv2.IMWRITE_WEBP_QUALITY}[settings.encode_format]
    ok, encoded = cv2.imencode(f".{settings.encode_format}", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                               [int(flag), settings.encode_quality])
    if not ok:
        raise ImageRefused(RESIZE_ERROR, f"cv2.imencode failed for {settings.encode_format}")
    return encoded.tobytes()


def encode_for_training(body: bytes, settings: EncodeSettings) -> EncodedImage:
    """Decode ``body`` (bounded by ``settings.max_pixels``) and return the stored training image.

    Raises :class:`ImageRefused` with reason ``not_an_image``, ``truncated_image``,
    ``too_many_pixels`` or ``resize_error``.
    """
    if not body:
        raise ImageRefused(NOT_AN_IMAGE, "empty body")
    truncated = truncation_reason(body)
    if truncated is not None:
        raise ImageRefused(truncated, "the bytes stop before the format's end structure")
    image = _open(body, settings)
    try:
        upright, width, height = _decode_upright(image, settings)
        pixels = _resize(_rgb_pixels(upright), width, height, settings)
        data = _encode(pixels, settings)
    except ImageRefused:
        raise
    except Exception as error:
        raise ImageRefused(RESIZE_ERROR, f"{type(error).__name__}: {error}") from error
    finally:
        image.close()
    return EncodedImage(data=data, width=int(pixels.shape[1]), height=int(pixels.shape[0]),
                        original_width=width, original_height=height)
