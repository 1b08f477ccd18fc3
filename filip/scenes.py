"""Generated scenes with known object positions, and a word-patch localisation score.

A scene is a few coloured shapes (distinct colours, distinct shapes) on a noisy background, with a
caption naming them ("a red circle and a blue square."). The localisation score is the share of
object-word tokens (colour and shape words) whose best-matching patch lies inside the object the word
names; a patch lies inside when the object covers at least half of it. The chance level (a random
patch) is reported beside it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "purple": (150, 40, 190), "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
CONNECTORS: tuple[str, ...] = (" and ", " next to ", " with ")


@dataclass
class SceneObject:
    """One shape: its colour and shape words and its pixel mask [H, W]."""

    colour: str
    shape: str
    mask: np.ndarray


@dataclass
class Scene:
    """A generated image, its caption and the objects the caption names."""

    image: "PIL.Image.Image"  # noqa: F821 - PIL is imported where used
    caption: str
    objects: list[SceneObject]


def _shape_mask(shape: str, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    if shape == "circle":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    if shape == "triangle":  # apex at the top middle, base along the bottom
        cx, height = (x0 + x1) / 2, y1 - y0
        half_width = (yy - y0) / height * (x1 - x0) / 2
        return (yy >= y0) & (yy < y1) & (np.abs(xx - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, grid: int, span: int, count: int) -> list[tuple[int, int]]:
    """Top-left cells of `count` non-overlapping span x span blocks, drawn uniformly by rejection."""
    for _ in range(1000):
        taken = np.zeros((grid, grid), dtype=bool)
        corners: list[tuple[int, int]] = []
        for _ in range(count):
            free = [(r, c) for r in range(grid - span + 1) for c in range(grid - span + 1)
                    if not taken[r:r + span, c:c + span].any()]
            if not free:
                break  # an unlucky first pick left no room: start over
            r, c = free[rng.integers(len(free))]
            taken[r:r + span, c:c + span] = True
            corners.append((r, c))
        if len(corners) == count:
            return corners
    raise ValueError(f"{count} objects of span {span} do not fit a {grid}x{grid} grid")


def generate_scene(rng: np.random.Generator, size: int = 64, grid: int = 4,
                   num_objects: int = 2, span: int = 2) -> Scene:
    """One scene of `size` px whose objects each cover about `span` x `span` cells of a `grid` grid."""
    from PIL import Image

    if num_objects > len(SHAPES):
        raise ValueError(f"at most {len(SHAPES)} objects (shapes are distinct)")
    cell = size / grid
    colours = rng.choice(list(COLOURS), size=num_objects, replace=False)
    shapes = rng.choice(SHAPES, size=num_objects, replace=False)
    pixels = rng.integers(40, 90, size=(size, size, 3)).astype(np.uint8)
    corners = _place(rng, grid, span, num_objects)
    objects: list[SceneObject] = []
    # A thin margin keeps neighbours apart while every shape still covers over half of at least
    # two of its patches.
    margin = max(1, round(cell * 0.08))
    for (r, c), colour, shape in zip(corners, colours, shapes):
        box = (round(c * cell) + margin, round(r * cell) + margin,
               round((c + span) * cell) - margin, round((r + span) * cell) - margin)
        mask = _shape_mask(str(shape), size, box)
        pixels[mask] = COLOURS[str(colour)]
        objects.append(SceneObject(str(colour), str(shape), mask))
    order = rng.permutation(num_objects)
    phrases = [f"{objects[i].colour} {objects[i].shape}" for i in order]
    caption = "a " + phrases[0]
    for phrase in phrases[1:]:
        caption += str(rng.choice(CONNECTORS)) + "a " + phrase
    return Scene(Image.fromarray(pixels), caption + ".", objects)


def generate_scenes(count: int, seed: int = 0, size: int = 64, grid: int = 4, min_objects: int = 1,
                    max_objects: int = 2) -> list[Scene]:
    """`count` scenes with min_objects..max_objects objects each, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, size, grid, int(rng.integers(min_objects, max_objects + 1)))
            for _ in range(count)]


def word_positions(caption: str, pieces: Sequence[str],
                   positions: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Groups the counting token `positions` by the caption word they spell: (word letters, positions).

    Pieces are matched character by character against the caption without whitespace, so this works
    whether or not the tokenizer's piece strings keep word-boundary markers; special tokens such as
    '<start>' and pieces that do not match belong to no word.
    """
    words = caption.lower().split()
    joined = "".join(words)
    owner = [w for w, word in enumerate(words) for _ in word]
    counted = set(positions)
    grouped: dict[int, list[int]] = {}
    offset = 0
    for position, piece in enumerate(pieces):
        if re.fullmatch(r"<[^>]*>|\[[^\]]*\]", piece):
            continue
        text = piece.replace("\u2581", "").replace("</w>", "").lower()
        if not text or not joined.startswith(text, offset):
            continue
        # Punctuation glued to a word ("square.") names nothing: only pieces with letters count.
        if position in counted and re.search(r"[a-z]", text):
            grouped.setdefault(owner[offset], []).append(position)
        offset += len(text)
    return [(re.sub(r"[^a-z]", "", words[w]), members) for w, members in sorted(grouped.items())]


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Share of each patch's pixels inside `mask`, flattened row-major to [gh * gw]."""
    gh, gw = grid
    h, w = mask.shape
    return mask.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3)).reshape(-1)


def localisation_counts(similarity: torch.Tensor, caption: str, pieces: Sequence[str],
                        positions: Sequence[int], objects: Sequence[SceneObject],
                        grid: tuple[int, int]) -> dict[str, float]:
    """Counts for one scene: object-word `tokens`, `hits` (best patch inside the named object),
    `other` (inside another object instead) and `chance` (expected hits of a random patch).

    similarity: [P, T] patch-token cosine, columns in the order of `positions` (the counting tokens).
    """
    column = {pos: j for j, pos in enumerate(positions)}
    best_patch = similarity.argmax(dim=0)
    inside = [patch_coverage(obj.mask, grid) >= 0.5 for obj in objects]
    counts = {"tokens": 0, "hits": 0, "other": 0, "chance": 0.0}
    for word, members in word_positions(caption, pieces, positions):
        for k, obj in enumerate(objects):
            if word not in (obj.colour, obj.shape):
                continue
            for pos in members:
                patch = int(best_patch[column[pos]])
                counts["tokens"] += 1
                counts["hits"] += int(inside[k][patch])
                counts["other"] += int(any(mask[patch] for j, mask in enumerate(inside) if j != k))
                counts["chance"] += float(inside[k].mean())
    return counts


@torch.inference_mode()
def evaluate_localisation(bundle, num_scenes: int = 200, seed: int = 1234,
                          device: str | torch.device = "cpu", batch_size: int = 64,
                          objects_per_scene: int = 2) -> dict:
    """Localisation (percent) of a checkpoint on scenes drawn at its own input size and grid.

    Scenes have `objects_per_scene` objects (two by default) so that a hit needs the right object,
    not merely a salient one; `other_object` is the share that picked another object instead.
    """
    from PIL import Image

    from filip.features import extract_image_features, extract_text_features

    model = bundle.model.to(device).eval()
    grid = tuple(model.grid_size)
    height, width = bundle.image_transform(Image.new("RGB", (64, 64))).shape[-2:]
    if height != width or grid[0] != grid[1]:
        raise ValueError("generated scenes are square; this model's input or grid is not")
    scenes = generate_scenes(num_scenes, seed, height, grid[0], objects_per_scene, objects_per_scene)
    images = extract_image_features(model, [bundle.image_transform(s.image) for s in scenes], device,
                                    batch_size)
    texts = extract_text_features(model, bundle.tokenizer, [s.caption for s in scenes], device)
    totals = {"tokens": 0, "hits": 0, "other": 0, "chance": 0.0}
    for i, scene in enumerate(scenes):
        positions = texts.mask[i].nonzero().flatten().tolist()
        similarity = images.tokens[i].float() @ texts.tokens[i, positions].float().T
        counts = localisation_counts(similarity, scene.caption,
                                     bundle.tokenizer.token_strings(scene.caption), positions,
                                     scene.objects, grid)
        totals = {key: totals[key] + counts[key] for key in totals}
    if totals["tokens"] == 0:
        raise ValueError("no object-word token found: does token_strings() align with the captions?")
    n = totals["tokens"]
    return {"localisation": 100.0 * totals["hits"] / n, "other_object": 100.0 * totals["other"] / n,
            "chance": 100.0 * totals["chance"] / n, "object_word_tokens": n, "num_scenes": num_scenes}
