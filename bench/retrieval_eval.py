"""FILIP retrieval scoring of 1,000 images x 5,000 captions: the packed path against the old one.

    .venv/bin/python bench/retrieval_eval.py                  # both paths, one JSON line
    .venv/bin/python bench/retrieval_eval.py --lengths full --skip-old   # worst case, new path only

Features are random but shaped like the base preset's (49 patches of 7x7, D=256, 16-bit, unit norm)
and laid out as the model emits them ([start, pieces..., end, pad...], start/end not counted). Caption
lengths are those of the 5,000 Flickr8k-1k captions under the project tokenizer trained on them
(vocabulary 1,000, as the tests train it; the base vocabulary of 32,000 gives shorter captions), or 75
real tokens each with `--lengths full` (a timing worst case: recall saturates at 100 there unless
`--noise` is raised). Each caption's tokens are noisy copies of its image's patches, so recalls are far
from zero and a changed ranking would show.

Each path is timed from the feature banks to the recall dict (scores, then `retrieval_recalls`), with
the torch threads it finds (all cores by default); feature extraction is not part of either.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k"


def caption_lengths(source: str, captions: int) -> torch.Tensor:
    """Tokens per caption, start and end included (as the tokenizer's mask counts them)."""
    if source == "full":
        return torch.full((captions,), 77)
    from filip.tokenizer import FilipTokenizer, train_tokenizer

    with (FLICKR / "captions.csv").open(newline="", encoding="utf-8") as handle:
        texts = [row["caption"].strip() for row in csv.DictReader(handle)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = FilipTokenizer.load(train_tokenizer(texts, Path(tmp) / "tokenizer.model", 1000))
    _, mask = tokenizer(texts)
    lengths = mask.sum(dim=1)
    return lengths.repeat(-(-captions // len(lengths)))[:captions]


def make_features(images: int, captions: int, patches: int, dim: int, lengths: torch.Tensor, noise: float,
                  seed: int) -> tuple[Any, Any, list[int]]:
    """Image and text banks as `extract_*_features` returns them; caption c belongs to image c % images."""
    from filip.features import ImageFeatureBank, TextFeatureBank

    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(images, patches, dim, generator=gen), dim=-1)
    owner = torch.arange(captions) % images
    positions = int(lengths.max())
    picked = torch.randint(0, patches, (captions, positions), generator=gen)
    # Noise of norm about `noise` on each copied unit-norm patch: sets how hard retrieval is.
    scatter = torch.randn(captions, positions, dim, generator=gen) * (noise / dim ** 0.5)
    txt = torch.nn.functional.normalize(img[owner[:, None], picked] + scatter, dim=-1)
    index = torch.arange(positions)[None]
    # Start (0), end (length - 1) and padding do not take part, as with count_special_tokens off.
    mask = (index > 0) & (index < lengths[:, None] - 1)
    width = int(mask.any(dim=0).nonzero().max()) + 1  # extract_text_features cuts unused positions
    image_bank = ImageFeatureBank(tokens=img.half(), pooled=img[:, 0])
    text_bank = TextFeatureBank(tokens=txt[:, :width].half().contiguous(), mask=mask[:, :width].contiguous(),
                                pooled=txt[:, 0])
    return image_bank, text_bank, owner.tolist()


def timed(function: Callable[[], Any], row: dict[str, Any], name: str) -> Any:
    """Calls `function`; records its wall and CPU seconds and the load average before it in `row`."""
    row[f"{name}_load_avg_1min"] = round(os.getloadavg()[0], 2)
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    row[f"{name}_s"] = round(time.perf_counter() - wall, 2)
    row[f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    from filip.features import score_matrices
    from filip.metrics import _rank_of_best_positive, positives_from_groups
    from filip.retrieval import retrieval_recalls, retrieval_score_matrices

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--patches", type=int, default=49, help="base: (224 / 32)^2")
    parser.add_argument("--dim", type=int, default=256, help="embed_dim of every preset")
    parser.add_argument("--lengths", choices=("flickr", "full"), default="flickr")
    parser.add_argument("--skip-old", action="store_true", help="time the new path only")
    parser.add_argument("--noise", type=float, default=6.0, help="6: R@1 roughly 10-40%%")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    lengths = caption_lengths(args.lengths, args.captions)
    images, texts, owner = make_features(args.images, args.captions, args.patches, args.dim, lengths,
                                         args.noise, args.seed)
    row = {"bench": "retrieval_eval", "images": args.images, "captions": args.captions,
           "patches": args.patches, "dim": args.dim, "lengths": args.lengths, "noise": args.noise,
           "text_positions": texts.tokens.shape[1],
           "real_tokens_mean": round(float(texts.mask.sum(dim=1).float().mean()), 2),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count()}

    def new_path() -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, float]]:
        i2t, t2i = retrieval_score_matrices(images, texts, "filip")
        return (i2t, t2i), retrieval_recalls(i2t, t2i, owner)

    def old_path() -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, float]]:
        i2t, t2i = score_matrices(images, texts, "filip")
        return (i2t, t2i), retrieval_recalls(i2t, t2i, owner)

    new_scores, new_recalls = timed(new_path, row, "new")
    row["recalls"] = {k: round(v, 2) for k, v in new_recalls.items()}
    if not args.skip_old:
        old_scores, old_recalls = timed(old_path, row, "old")
        row["speedup"] = round(row["old_s"] / row["new_s"], 1)
        row["recalls_identical"] = new_recalls == old_recalls
        positives = positives_from_groups(torch.arange(args.images), owner)
        # The 0-based rank of every query's best positive under the metrics' own tie rule.
        row["ranks_identical"] = all(
            torch.equal(_rank_of_best_positive(new, pos), _rank_of_best_positive(old, pos))
            for new, old, pos in ((new_scores[0], old_scores[0], positives),
                                  (new_scores[1].T, old_scores[1].T, positives.T)))
        row["max_abs_score_diff"] = max(float((n - o).abs().max()) for n, o in zip(new_scores, old_scores))
    row["command_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
