"""Accuracy of the FILIP loss's late interaction in each gather dtype, against float64.

    python bench/loss_precision.py --batch 64 --patches 49 --words 77 --dim 256 --seeds 3

For every dtype (float16, bfloat16, float32) the loss and its gradients with respect to the image
and text tokens are compared with the same loss computed in float64 without autocast, with and
without an outer bf16 autocast (the trainer's). Features are unit vectors; each caption's words
are noisy copies of patches of its own image (cosine ~0.6), so positives stand out as in
training, and captions have 8 to `--words` real tokens. Token selection is off: this isolates
the arithmetic. Prints one JSON line: per dtype and autocast setting, the worst over seeds of the
loss's relative error, the gradients' relative error (norm of difference / norm) and the
smallest gradient cosine, plus the CPU seconds of one forward+backward.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filip.loss import FilipLoss  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def paired_batch(b: int, p: int, l: int, d: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, p, d, generator=gen, dtype=torch.float64), dim=-1)
    source = torch.randint(0, p, (b, l), generator=gen)
    copied = img[torch.arange(b)[:, None], source]  # [B, L, D]
    noise = F.normalize(torch.randn(b, l, d, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(0.6 * copied + 0.8 * noise, dim=-1)
    lengths = torch.randint(min(8, l), l + 1, (b,), generator=gen)
    mask = torch.arange(l)[None] < lengths[:, None]
    return img, txt, mask


def loss_and_grads(img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor, scale: float,
                   dtype: torch.dtype, autocast: bool
                   ) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    loss_fn = FilipLoss(token_keep_ratio=1.0, gather_dtype=dtype)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    start = time.perf_counter()
    with context:
        loss = loss_fn(img, txt, mask, torch.tensor(scale, dtype=torch.float64))
    loss.backward()
    return loss.item(), img.grad, txt.grad, time.perf_counter() - start


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), ref.flatten(), dim=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=49)
    parser.add_argument("--words", type=int, default=77)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--scale", type=float, default=100.0, help="logit scale (100 = CLIP's cap)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    for seed in range(args.seeds):
        img, txt, mask = paired_batch(args.batch, args.patches, args.words, args.dim, seed)
        ref_loss, ref_img, ref_txt, _ = loss_and_grads(img, txt, mask, args.scale, torch.float64,
                                                       False)
        for name, dtype in DTYPES.items():
            for autocast in (False, True):
                loss, g_img, g_txt, seconds = loss_and_grads(img, txt, mask, args.scale, dtype,
                                                             autocast)
                row = results.setdefault(f"{name}{'+autocast_bf16' if autocast else ''}", {
                    "loss_rel_err": 0.0, "grad_img_rel_err": 0.0, "grad_txt_rel_err": 0.0,
                    "grad_img_cos_min": 1.0, "grad_txt_cos_min": 1.0, "seconds": 0.0})
                row["loss_rel_err"] = max(row["loss_rel_err"], abs(loss - ref_loss) / abs(ref_loss))
                row["grad_img_rel_err"] = max(row["grad_img_rel_err"], rel(g_img, ref_img))
                row["grad_txt_rel_err"] = max(row["grad_txt_rel_err"], rel(g_txt, ref_txt))
                row["grad_img_cos_min"] = min(row["grad_img_cos_min"], cosine(g_img, ref_img))
                row["grad_txt_cos_min"] = min(row["grad_txt_cos_min"], cosine(g_txt, ref_txt))
                row["seconds"] = max(row["seconds"], seconds)
    rounded = {k: {m: float(f"{v:.3g}") for m, v in row.items()} for k, row in results.items()}
    print(json.dumps({"bench": "loss_precision", **vars(args), "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "results": rounded}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
