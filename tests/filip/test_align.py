"""Word-patch alignment figure and the localisation score on generated scenes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from filip.align import GRID_COLOUR, add_cli_arguments, cli_main
from filip.checkpoint import load_for_inference
from filip.scenes import (evaluate_localisation, generate_scenes, localisation_counts, patch_coverage,
                          word_positions)


def test_align_png_has_the_model_grid(tiny_checkpoint: Path, flickr_dir: Path, tmp_path: Path) -> None:
    image = sorted((flickr_dir / "images").iterdir())[0]
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    out, summary_path = tmp_path / "align.png", tmp_path / "align.json"
    args = parser.parse_args([str(tiny_checkpoint), str(image), "a dog runs on the grass.",
                              "--out", str(out), "--json", str(summary_path), "--cell-px", "40"])
    assert cli_main(args) == 0
    from PIL import Image

    gh, gw = load_for_inference(tiny_checkpoint).model.grid_size
    pixels = np.asarray(Image.open(out).convert("RGB"))
    # The panel is gh x gw cells of 40 px; the legend below it adds rows only.
    assert pixels.shape[1] == gw * 40 and pixels.shape[0] > gh * 40
    panel = pixels[: gh * 40]
    grid = np.all(panel == GRID_COLOUR, axis=-1)
    for k in range(gw + 1):
        assert grid[:, min(k * 40, gw * 40 - 1)].all(), f"vertical grid line {k} missing"
    for k in range(gh + 1):
        assert grid[min(k * 40, gh * 40 - 1), :].all(), f"horizontal grid line {k} missing"
    assert not grid[:, 20].all() and not grid[20, :].all()  # the middle of a cell is not a line
    summary = json.loads(summary_path.read_text())
    assert summary["grid"] == [gh, gw]
    assert len(summary["patch_best_token"]) == gh and len(summary["patch_best_token"][0]) == gw
    words = "".join(t["token"] for t in summary["tokens"])
    assert "dog" in words and "grass" in words
    assert all(0 <= t["best_patch"][0] < gh and 0 <= t["best_patch"][1] < gw for t in summary["tokens"])


def test_words_are_found_with_or_without_boundary_markers() -> None:
    plain = ["<start>", "a", "red", "cir", "cle", "and", "a", "blue", "squ", "are", ".", "<end>"]
    marked = ["<start>", "\u2581a", "\u2581red", "\u2581cir", "cle", "\u2581and", "\u2581a", "\u2581blue",
              "\u2581squ", "are", ".", "<end>"]
    for pieces in (plain, marked):
        words = word_positions("a red circle and a blue square.", pieces, range(1, 11))
        assert words == [("a", [1]), ("red", [2]), ("circle", [3, 4]), ("and", [5]), ("a", [6]),
                         ("blue", [7]), ("square", [8, 9])]


def test_localisation_counts_reward_the_named_object() -> None:
    scene = generate_scenes(1, seed=3, size=64, grid=4, min_objects=2, max_objects=2)[0]
    pieces = ["<start>", *scene.caption.replace(".", " .").split(), "<end>"]
    positions = list(range(1, len(pieces) - 1))
    inside = {o.colour: patch_coverage(o.mask, (4, 4)) for o in scene.objects}
    inside.update({o.shape: patch_coverage(o.mask, (4, 4)) for o in scene.objects})
    # An oracle: every word prefers the patch its object covers most; a swapped one picks the other.
    oracle = torch.zeros(16, len(positions))
    swapped = torch.zeros(16, len(positions))
    other = {o.colour: scene.objects[1 - k] for k, o in enumerate(scene.objects)}
    other.update({o.shape: scene.objects[1 - k] for k, o in enumerate(scene.objects)})
    for j, word in enumerate(pieces[1:-1]):
        if word in inside:
            oracle[int(np.argmax(inside[word])), j] = 1.0
            swapped[int(np.argmax(patch_coverage(other[word].mask, (4, 4)))), j] = 1.0
    counts = localisation_counts(oracle, scene.caption, pieces, positions, scene.objects, (4, 4))
    assert counts["tokens"] == 4 and counts["hits"] == 4 and counts["other"] == 0
    assert 0.0 < counts["chance"] < 4.0
    counts = localisation_counts(swapped, scene.caption, pieces, positions, scene.objects, (4, 4))
    assert counts["hits"] == 0 and counts["other"] == 4


def test_scenes_are_reproducible_and_shapes_cover_their_patches() -> None:
    first, again = generate_scenes(5, seed=7), generate_scenes(5, seed=7)
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    for scene in first:
        for obj in scene.objects:
            assert obj.colour in scene.caption and obj.shape in scene.caption
            assert (patch_coverage(obj.mask, (4, 4)) >= 0.5).sum() >= 2


def test_localisation_runs_on_a_checkpoint(tiny_checkpoint: Path) -> None:
    result = evaluate_localisation(load_for_inference(tiny_checkpoint), num_scenes=20)
    assert result["num_scenes"] == 20 and result["object_word_tokens"] >= 80
    assert 0.0 <= result["localisation"] + result["other_object"] <= 100.0
    # A random patch lands inside a 2 x 2-cell object on 2 (triangle) to 4 of the 16 patches.
    assert 100.0 * 2 / 16 <= result["chance"] <= 100.0 * 4 / 16
