"""Word-patch alignment: `filip align CHECKPOINT IMAGE "a photo of a balloon."`.

For each text token that takes part in late interaction, the patch it matches best; for each patch,
the token it matches best. Drawn over the image as in the FILIP paper's figure: every patch carries
the number of its best token, every token outlines its best patch, a legend maps numbers to tokens.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:  # torch is imported where used, so `filip --help` stays fast
    import torch
    from PIL import Image


GRID_COLOUR = (255, 255, 255)
# Saturated colours, none of them pure white, so grid lines stay identifiable in the picture.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
           (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))
MIN_CELL_PX = 48
# Narrow grids are drawn bigger so that numbers and the legend stay readable.
MIN_PANEL_PX = 384


@dataclass
class Alignment:
    """Cosine similarity of every patch with every counting token of one image-text pair."""

    grid: tuple[int, int]
    tokens: list[str]
    positions: list[int]
    similarity: torch.Tensor  # [P, T], patches in row-major order

    @property
    def token_best_patch(self) -> torch.Tensor:
        """[T] flat index of the best patch for each token."""
        return self.similarity.argmax(dim=0)

    @property
    def patch_best_token(self) -> torch.Tensor:
        """[P] index (into `tokens`) of the best token for each patch."""
        return self.similarity.argmax(dim=1)

    def to_dict(self) -> dict:
        gw = self.grid[1]
        return {
            "grid": list(self.grid),
            "tokens": [{"position": pos, "token": tok, "best_patch": [int(p) // gw, int(p) % gw]}
                       for pos, tok, p in zip(self.positions, self.tokens, self.token_best_patch)],
            "patch_best_token": self.patch_best_token.view(*self.grid).tolist(),
        }


def display_token(piece: str) -> str:
    """A token string without the word-boundary markers of SentencePiece ('▁') and CLIP BPE ('</w>')."""
    return piece.replace("\u2581", "").replace("</w>", "") or piece


def compute_alignment(bundle, image, text: str, device: str | torch.device = "cpu") -> Alignment:
    """Encodes one PIL image and one text with the checkpoint and pairs their tokens."""
    import torch

    model = bundle.model.to(device).eval()
    pixels = bundle.image_transform(image.convert("RGB")).unsqueeze(0).to(device)
    ids, mask = bundle.tokenizer([text])
    with torch.inference_mode():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(ids.to(device), mask.to(device))
    counted = text_features.mask[0].nonzero().flatten().tolist()
    pieces = bundle.tokenizer.token_strings(text)
    tokens = [pieces[p] if p < len(pieces) else f"#{p}" for p in counted]
    similarity = image_features.tokens[0].float() @ text_features.tokens[0, counted].float().T
    return Alignment(grid=tuple(model.grid_size), tokens=tokens, positions=counted,
                     similarity=similarity.cpu())


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def render_alignment(image, alignment: Alignment, caption: str = "",
                     cell_px: int | None = None, input_size: tuple[int, int] | None = None):
    """The figure as a PIL image: a gh x gw grid of `cell_px` squares over the image, legend below.

    `input_size` (H, W) is what the model saw; the image is centre-fitted to its aspect ratio first,
    as a resize-and-centre-crop transform does, so patches line up with what was scored.
    """
    from PIL import Image, ImageDraw, ImageOps

    gh, gw = alignment.grid
    height, width = input_size or (image.height, image.width)
    cell = cell_px or max(MIN_CELL_PX, math.ceil(MIN_PANEL_PX / max(gh, gw)),
                          math.ceil(max(height / gh, width / gw)))
    panel = ImageOps.fit(image.convert("RGB"), (width, height)).resize((gw * cell, gh * cell))
    # Darkened so coloured numbers read on any photo.
    panel = Image.blend(panel, Image.new("RGB", panel.size), 0.35)
    draw = ImageDraw.Draw(panel)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(alignment.tokens))]
    font = _font(max(10, cell // 3))
    for patch, token in enumerate(alignment.patch_best_token.tolist()):
        row, col = divmod(patch, gw)
        centre = (col * cell + cell / 2, row * cell + cell / 2)
        draw.text(centre, str(token), fill=colours[token], font=font, anchor="mm",
                  stroke_width=2, stroke_fill=(0, 0, 0))
    outlines_in_patch: dict[int, int] = {}
    for token, patch in enumerate(alignment.token_best_patch.tolist()):
        # Tokens sharing a patch get nested outlines, inset so they never cover the grid lines.
        inset = 2 + 4 * outlines_in_patch.get(patch, 0)
        outlines_in_patch[patch] = outlines_in_patch.get(patch, 0) + 1
        row, col = divmod(patch, gw)
        if 2 * inset + 2 < cell:
            draw.rectangle((col * cell + inset, row * cell + inset,
                            (col + 1) * cell - 1 - inset, (row + 1) * cell - 1 - inset),
                           outline=colours[token], width=2)
    for k in range(gw + 1):
        x = min(k * cell, gw * cell - 1)
        draw.line((x, 0, x, gh * cell - 1), fill=GRID_COLOUR, width=1)
    for k in range(gh + 1):
        y = min(k * cell, gh * cell - 1)
        draw.line((0, y, gw * cell - 1, y), fill=GRID_COLOUR, width=1)
    return _with_legend(panel, alignment.tokens, colours, caption)


def _wrap(items: list[tuple[str, tuple[int, int, int]]], gap: str, width: float, measure,
          font) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """Greedy line filling: items separated by `gap`, a new line when the next would overflow."""
    rows: list[list[tuple[str, tuple[int, int, int]]]] = []
    used = 0.0
    for text, colour in items:
        size = measure.textlength(text + gap, font=font)
        if not rows or used + measure.textlength(text, font=font) > width:
            rows.append([])
            used = 0.0
        rows[-1].append((text, colour))
        used += size
    return rows


def _with_legend(panel, tokens: list[str], colours: list[tuple[int, int, int]], caption: str):
    """Appends a legend under the panel: the caption, then `number: token` entries wrapped to width."""
    from PIL import Image, ImageDraw

    font = _font(14)
    line_h, pad = 18, 6
    width = panel.width - 2 * pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption_rows = _wrap([(w, (235, 235, 235)) for w in caption.split()], " ", width, measure, font)
    entries = [(f"{i}: {display_token(t)}", colours[i]) for i, t in enumerate(tokens)]
    token_rows = _wrap(entries, "   ", width, measure, font)
    legend = Image.new("RGB", (panel.width, pad * 2 + line_h * (len(caption_rows) + len(token_rows))),
                       (20, 20, 20))
    draw = ImageDraw.Draw(legend)
    for n, (row, gap) in enumerate([(r, " ") for r in caption_rows] + [(r, "   ") for r in token_rows]):
        x = float(pad)
        for text, colour in row:
            draw.text((x, pad + line_h * n), text, fill=colour, font=font)
            x += measure.textlength(text + gap, font=font)
    figure = Image.new("RGB", (panel.width, panel.height + legend.height))
    figure.paste(panel, (0, 0))
    figure.paste(legend, (0, panel.height))
    return figure


def read_image(path: Path) -> Image.Image:
    """The image at `path` as RGB; a file PIL cannot decode is the user's error, named."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image (PIL cannot identify its format)") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # the command line reports these as `path: reason`
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt: PIL raises these
        raise UserError(f"{path}: the image cannot be decoded ({' '.join(str(err).split())[:120]})") from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `filip align`."""
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by `filip train`")
    parser.add_argument("image", type=Path, help="the image to explain")
    parser.add_argument("text", help='the text, e.g. "a photo of a balloon."')
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: <image stem>.align.png in the current folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the alignment as JSON")
    parser.add_argument("--cell-px", type=int, default=None, help="pixels per patch in the figure")
    parser.add_argument("--device", default="cpu")


def cli_main(args: argparse.Namespace) -> int:
    """Runs `filip align`; returns the exit code."""
    from filip.checkpoint import load_for_inference

    image = read_image(args.image)  # before the checkpoint: a wrong image path costs no model load
    bundle = load_for_inference(args.checkpoint, device=args.device)
    alignment = compute_alignment(bundle, image, args.text, args.device)
    input_size = tuple(bundle.image_transform(image).shape[-2:])
    figure = render_alignment(image, alignment, args.text, args.cell_px, input_size)
    out = args.out or Path(f"{args.image.stem}.align.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    summary = alignment.to_dict()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for item in summary["tokens"]:
        print(f"{display_token(item['token']):>16}  -> patch (row {item['best_patch'][0]}, "
              f"col {item['best_patch'][1]})")
    print(f"wrote {out} (grid {alignment.grid[0]}x{alignment.grid[1]})")
    return 0
