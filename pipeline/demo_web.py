"""The demo's sample web: generated scenes with captions that name what is drawn, at varied sizes,
with exact and near duplicates and broken URLs. Deterministic for a seed."""
from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
           "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (210, 190, 150), "sky": (150, 200, 235),
               "grass": (110, 160, 90)}


@dataclass
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in pixels


def draw_scene(width: int, height: int, rng: random.Random, n_objects: int = 2
               ) -> tuple[Image.Image, list[SceneObject], str]:
    """A background with `n_objects` coloured shapes in separate horizontal slots; returns the
    image, the objects with their boxes, and a caption naming them left to right."""
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    # Texture, so that perceptual hashes of different scenes differ in more than the shapes.
    for _ in range(24):
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = rng.randint(width // 10, width // 3), rng.randint(height // 10, height // 3)
        shade = tuple(max(0, min(255, c + rng.randint(-70, 70))) for c in BACKGROUNDS[background])
        draw.ellipse([x - w // 2, y - h // 2, x + w // 2, y + h // 2], fill=shade)
    colours = rng.sample([c for c in COLOURS if c != "white"], n_objects)
    objects = []
    slot = width // n_objects
    for i, colour in enumerate(colours):
        shape = rng.choice(SHAPES)
        size = int(min(slot, height) * rng.uniform(0.45, 0.7))
        left = i * slot + rng.randint(0, max(0, slot - size))
        top = rng.randint(0, max(0, height - size))
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)],
                         fill=COLOURS[colour])
        objects.append(SceneObject(shape, colour, box))
    names = [f"a {o.colour} {o.shape}" for o in objects]
    caption = f"{' and '.join(names)} on a {background} background"
    return image, objects, caption


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def generate_sample_web(folder: Path, n_images: int = 240, seed: int = 0) -> list[dict]:
    """Write the web's files under `folder` and return the URL list rows (path, caption, expect).

    `path` is relative to the server root; `expect` says what the pipeline should do with it.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    originals: list[tuple[str, Image.Image, str]] = []
    for i in range(n_images):
        roll = rng.random()
        if roll < 0.10:
            size, expect = (rng.randint(90, 180), rng.randint(90, 180)), "too_small"
        elif roll < 0.15:
            size, expect = (rng.randint(700, 900), rng.randint(200, 230)), "bad_aspect_ratio"
        else:
            size, expect = (rng.randint(256, 480), rng.randint(256, 480)), "kept"
        image, _, caption = draw_scene(*size, rng)
        name = f"scene{i:04d}.jpg"
        (folder / name).write_bytes(_jpeg(image))
        originals.append((name, image, caption))
        rows.append({"path": f"/img/{name}", "caption": caption, "expect": expect})
    kept = [o for o, r in zip(originals, rows) if r["expect"] == "kept"]
    for j, (name, image, caption) in enumerate(kept[:12]):  # exact copies under another URL
        rows.append({"path": f"/img/{name}?copy={j}", "caption": f"copy of {caption}",
                     "expect": "exact_duplicate"})
    for j, (name, image, caption) in enumerate(kept[12:24]):  # near copies: resized, recompressed
        near = image.resize((int(image.width * 0.8), int(image.height * 0.8)))
        near_name = f"near{j:03d}.jpg"
        (folder / near_name).write_bytes(_jpeg(near, quality=60))
        # Half keep the original's caption: same caption and same image cluster is a reason of its own.
        same = j % 2 == 0
        rows.append({"path": f"/img/{near_name}", "caption": caption if same else f"a smaller copy: {caption}",
                     "expect": "duplicate_caption_and_image" if same else "near_duplicate"})
    faults = [("/status/404", "http_404"), ("/status/500", "http_500"), ("/notimage/1", "not_an_image"),
              ("/loop/1", "redirect_loop")]
    for j in range(3):
        for path, expect in faults:
            rows.append({"path": f"{path}?n={j}", "caption": "a photo behind a broken link", "expect": expect})
    for j, (name, _, caption) in enumerate(kept[24:27]):
        rows.append({"path": f"/truncated/{name}", "caption": caption, "expect": "truncated_image"})
    for j, (name, _, caption) in enumerate(kept[27:29]):
        rows.append({"path": f"/slow/{name}", "caption": caption, "expect": "timeout"})
    for j, (name, _, caption) in enumerate(kept[29:31]):
        rows.append({"path": f"/noai/{name}", "caption": caption, "expect": "robots_optout"})
    # Captions in other languages: the caption-language stage drops them before any fetch.
    foreign = ["ein roter Kreis und ein blaues Quadrat auf grünem Hintergrund",
               "красный круг и синий квадрат на зелёном фоне", "绿色背景上的红色圆形和蓝色正方形"]
    for j, ((name, _, _), text) in enumerate(zip(kept[31:34], foreign)):
        rows.append({"path": f"/img/{name}?lang={j}", "caption": text, "expect": "caption_language"})
    return rows


def write_url_list(rows: list[dict], base_url: str, path: Path) -> None:
    """The URL list as CSV, plus rows the input stage must refuse (bad scheme, empty, repeated)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "expect"])
        for row in rows:
            writer.writerow([base_url + row["path"], row["caption"], row["expect"]])
        writer.writerow(["ftp://example.org/a.jpg", "a file on ftp", "unsupported_scheme"])
        writer.writerow(["", "no url at all", "empty_url"])
        first = rows[0]
        writer.writerow([base_url + first["path"], first["caption"], "duplicate_row"])


def write_eval_sets(folder: Path, seed: int = 1, per_class: int = 10, retrieval_images: int = 60) -> dict:
    """Held-out scenes (another seed than the web) for the demo's evaluation of its model.

    `zeroshot/<colour>/`: one shape per image, its colour is the class (ImageFolder layout);
    `retrieval/captions.csv` + `retrieval/images/`: two-shape scenes with their captions.
    """
    rng = random.Random(seed)
    classes = [c for c in COLOURS if c != "white"]
    counts = dict.fromkeys(classes, 0)
    while min(counts.values()) < per_class:
        image, objects, _ = draw_scene(256, 256, rng, n_objects=1)
        colour = objects[0].colour
        if counts[colour] < per_class:
            target = folder / "zeroshot" / colour / f"{counts[colour]:03d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_jpeg(image))
            counts[colour] += 1
    images = folder / "retrieval" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with (folder / "retrieval" / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(retrieval_images):
            image, _, caption = draw_scene(256, 256, rng)
            (images / f"{i:04d}.jpg").write_bytes(_jpeg(image))
            writer.writerow([f"{i:04d}.jpg", caption])
    return {"zeroshot": folder / "zeroshot", "retrieval": folder / "retrieval" / "captions.csv"}
