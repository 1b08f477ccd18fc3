"""Dedup quality on real photos: recall per transformation and false merges per pHash threshold.

Every Flickr8k photo gets one transformed copy per transformation; recall at threshold t is the
share of copies within t bits of their original; false merges at t are pairs of distinct photos
within t bits. Prints one JSON line.

    .venv/bin/python bench/dedup_quality.py --images ../shared/data/flickr8k-1k/images
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from filters.dedup import hamming
from filters.image import inspect_image


FLICKR_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k" / "images"

def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _crop(fraction: float, centred: bool = True):
    def crop(image: Image.Image) -> bytes:
        width, height = image.size
        cut_x, cut_y = round(width * fraction), round(height * fraction)
        box = ((cut_x // 2, cut_y // 2, width - cut_x + cut_x // 2, height - cut_y + cut_y // 2)
               if centred else (0, 0, width - cut_x, height - cut_y))
        return _jpeg(image.crop(box))
    return crop


def _brighten(factor: float):
    return lambda image: _jpeg(ImageEnhance.Brightness(image).enhance(factor))


TRANSFORMS = {
    "exact_copy": None,
    "resized_half": lambda image: _jpeg(image.resize((image.width // 2, image.height // 2), Image.BICUBIC)),
    "upscaled_double": lambda image: _jpeg(image.resize((image.width * 2, image.height * 2), Image.BICUBIC)),
    "recompressed_q50": lambda image: _jpeg(image, quality=50),
    "cropped_3pct_area_centred": _crop(0.015),
    "cropped_5pct_area_centred": _crop(0.025),
    "cropped_5pct_width_and_height_centred": _crop(0.05),
    "cropped_5pct_width_and_height_corner": _crop(0.05, centred=False),
    "brightened_1.1": _brighten(1.1),
    "brightened_1.2": _brighten(1.2),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, default=FLICKR_IMAGES)
    parser.add_argument("--thresholds", type=int, nargs="*", default=list(range(0, 13)))
    args = parser.parse_args(argv)
    paths = sorted(args.images.glob("*.jpg"))
    originals = np.array([inspect_image(path.read_bytes()).phash for path in paths], np.int64)
    distances: dict[str, np.ndarray] = {}
    for name, transform in TRANSFORMS.items():
        copies = []
        for path in paths:
            data = path.read_bytes()
            if transform is not None:
                with Image.open(io.BytesIO(data)) as image:
                    data = transform(image)
            copies.append(inspect_image(data).phash)
        distances[name] = hamming(originals, np.array(copies, np.int64))
    pairwise = np.concatenate([hamming(originals[i:i + 1], originals[i + 1:]) for i in range(len(paths) - 1)])
    report = {"bench": "dedup_quality", "photos": len(paths), "distinct_pairs": int(pairwise.size),
              "closest_distinct_pair": int(pairwise.min()), "by_threshold": []}
    for threshold in args.thresholds:
        row = {"threshold": threshold, "false_merges": int((pairwise <= threshold).sum())}
        row.update({name: round(float((values <= threshold).mean()), 4) for name, values in distances.items()})
        report["by_threshold"].append(row)
    report["max_distance"] = {name: int(values.max()) for name, values in distances.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
