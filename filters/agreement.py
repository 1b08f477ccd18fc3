"""Image-text agreement: how well a caption describes its own image, scored by a `filip train` checkpoint.

DataComp's strongest simple baseline keeps the pairs whose CLIP image-text similarity is highest;
here the similarity comes from the bundled trainer's own checkpoint. A FILIP checkpoint scores a
pair with the late interaction of `filip.loss.late_interaction_scores`, both directions averaged
(as `filip eval --zeroshot-similarity mean` does): image-to-text is the mean over patches of the
best caption token, text-to-image the mean over caption tokens of the best patch. A CLIP checkpoint
(loss_kind "clip") scores the cosine of the pooled features. Every pair is scored with its own
caption only ([B, P, L] per batch, never a B x B matrix). Features are L2-normalised, so every
score lies in [-1, 1]: the fixed-bin histograms below can be merged across shards and give a
run-wide cut for `keep_top_fraction` (pipeline/stages/filip_score.py).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

import numpy as np

from filters.base import LOW_AGREEMENT
from pipeline.configtools import FieldError, ranged
from pipeline.errors import UserError

if TYPE_CHECKING:  # torch is imported where used: the pipeline's CLI starts without it
    import torch

BIN_WIDTH = 1e-4
N_BINS = 20_000  # [-1, 1] in bins of BIN_WIDTH
# float32 edges, strictly increasing (float32 steps near 1 are 6e-8): a score's bin is >= b exactly
# when the score is >= EDGES[b], so a cut compared on float32 scores keeps what the histogram counted.
EDGES = np.linspace(-1.0, 1.0, N_BINS + 1).astype(np.float32)


@dataclass
class AgreementConfig:
    """Checkpoint to score with, and the cut: a fixed `threshold` or the run's `keep_top_fraction`.

    Exactly one of the two is set (the other null). `keep_top_fraction` 0.3 keeps the best 30% of
    the scored pairs of the whole run, DataComp's choice for its CLIP-score filter. `device` "auto"
    uses a CUDA GPU when the worker was given one, "cuda" requires it.
    """

    checkpoint: str | None = None
    threshold: float | None = ranged(None, "[-1, 1]")
    keep_top_fraction: float | None = ranged(0.3, "(0, 1]")
    batch_size: int = ranged(64, "[1, inf)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.keep_top_fraction is None):
            both = "both are set" if self.threshold is not None else "neither is set"
            raise FieldError("threshold", f"set exactly one of threshold and keep_top_fraction, the "
                                          f"other to null ({both})")


def checked_checkpoint(config: AgreementConfig) -> str:
    """The checkpoint's path; a UserError when none is set or it is not a file here."""
    from pathlib import Path

    if not config.checkpoint:
        raise UserError("filip_score.checkpoint: not set; name a `filip train` checkpoint "
                        "(a step_NNNNNNNN.pt file) to score the pairs with")
    if not Path(config.checkpoint).is_file():
        raise UserError(f"filip_score.checkpoint: {config.checkpoint}: no such file")
    return config.checkpoint


def pair_scores(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """[B] FILIP score of image b with text b: the mean of the diagonals of i2t and t2i of
    `filip.loss.late_interaction_scores`, from a [B, P, L] product (float32)."""
    import torch

    sim = torch.bmm(image_tokens.float(), text_tokens.float().transpose(1, 2))
    mask = text_mask.bool()
    i2t = sim.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=2).mean(dim=1)
    weight = mask.float() / mask.sum(dim=1, keepdim=True).float()
    t2i = (sim.amax(dim=1) * weight).sum(dim=1)
    return (i2t + t2i) / 2


class AgreementScorer:
    """Scores (image bytes, caption) pairs with a checkpoint; call :meth:`setup` once per worker.

    `use_gpu`: the worker holds a GPU (device "auto" takes it when torch sees one). `threads`: torch's
    CPU threads while set up (the worker's CPUs), restored by :meth:`teardown`.
    """

    def __init__(self, config: AgreementConfig, use_gpu: bool = False, threads: int | None = None) -> None:
        self.config = config
        self.use_gpu = use_gpu
        self.threads = threads
        self.bundle = None
        self.device = "cpu"
        self._saved_threads: int | None = None

    def setup(self) -> None:
        import torch

        from filip.checkpoint import load_for_inference

        checkpoint = checked_checkpoint(self.config)
        cuda = torch.cuda.is_available()
        if self.config.device == "cuda" and not cuda:
            raise UserError("filip_score.device: cuda, but this worker sees no CUDA GPU")
        wanted = self.config.device == "cuda" or (self.config.device == "auto" and self.use_gpu)
        self.device = "cuda" if wanted and cuda else "cpu"
        if self.threads is not None and self.device == "cpu":
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        self.bundle = load_for_inference(checkpoint, self.device)

    def teardown(self) -> None:
        import torch

        self.bundle = None
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def _pixels(self, data: bytes | None) -> torch.Tensor | None:
        from PIL import Image

        if not data:
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                return self.bundle.image_transform(image)
        except Exception:  # truncated, corrupt, a decompression bomb: the row fails, the batch goes on
            return None

    def score(self, images: list[bytes | None], captions: list[str | None]) -> np.ndarray:
        """float32 [N]: each image with its own caption; NaN where the image does not decode."""
        import torch

        if self.bundle is None:
            raise RuntimeError("AgreementScorer.setup() was not called")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        scores = np.full(len(images), np.nan, dtype=np.float32)
        pixels = [self._pixels(data) for data in images]
        usable = [i for i, p in enumerate(pixels) if p is not None]
        model, step = self.bundle.model, self.config.batch_size
        for start in range(0, len(usable), step):
            rows = usable[start:start + step]
            ids, mask = self.bundle.tokenizer([captions[i] or "" for i in rows])
            batch = torch.stack([pixels[i] for i in rows]).to(self.device)
            # bf16 on a GPU as in training and evaluation; the CPU stays in float32.
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda")
            with torch.inference_mode(), autocast:
                image = model.encode_image(batch)
                text = model.encode_text(ids.to(self.device), mask.to(self.device))
            with torch.inference_mode():
                if self.bundle.loss_kind == "clip":
                    values = (image.pooled.float() * text.pooled.float()).sum(dim=1)
                else:
                    values = pair_scores(image.tokens, text.tokens, text.mask)
            scores[rows] = values.cpu().numpy()
        return scores

    @staticmethod
    def reason(score: float, cut: float | None) -> str | None:
        """`low_image_text_agreement` below the cut (None: keep every scored pair)."""
        return LOW_AGREEMENT if cut is not None and score < cut else None


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Each finite score's bin in [0, N_BINS); scores past [-1, 1] (rounding) go to the end bins."""
    bins = np.searchsorted(EDGES, np.asarray(scores, dtype=np.float32), side="right") - 1
    return np.clip(bins, 0, N_BINS - 1)


def score_histogram(scores: np.ndarray) -> np.ndarray:
    """int64 [N_BINS] counts of the finite scores (NaN: not scored, not counted)."""
    scores = np.asarray(scores, dtype=np.float32)
    return np.bincount(score_bins(scores[np.isfinite(scores)]), minlength=N_BINS).astype(np.int64)


@dataclass
class TopFractionCut:
    """The run-wide cut for `keep_top_fraction`: keep the scores >= `cut` (None: keep all)."""

    cut: float | None
    cut_bin: int
    rows: int  # scored rows of the run
    target: int  # ceil(fraction x rows): the pairs asked for
    kept: int  # rows at or above the cut: target plus the rest of the cut's bin


def top_fraction_cut(counts: np.ndarray, fraction: float) -> TopFractionCut:
    """The lower edge of the bin that holds the target-th highest score s*: cut <= s* < cut + BIN_WIDTH.

    Every row at or above the cut is kept, ties with s* included, so `kept` >= `target` and it
    exceeds it only by rows of that one bin scoring below s*.
    """
    rows = int(counts.sum())
    # str(fraction) is the decimal the config wrote: 0.3 of 10 rows is 3 rows, not ceil(3.0000000000000004).
    target = min(rows, math.ceil(Fraction(str(fraction)) * rows))
    if target == 0:
        return TopFractionCut(None, 0, rows, 0, 0)
    at_or_above = np.cumsum(counts[::-1])[::-1]  # rows in bins >= b
    cut_bin = int(np.flatnonzero(at_or_above >= target)[-1])
    cut = None if cut_bin == 0 else float(EDGES[cut_bin])
    return TopFractionCut(cut, cut_bin, rows, target, int(at_or_above[cut_bin]))
