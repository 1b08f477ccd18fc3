"""`filip eval CHECKPOINT ...`: zero-shot classification, retrieval, linear probe, localisation.

Each task is optional and may be given several datasets. Results go to `eval.json` and `eval.md` in
`--out` and the Markdown tables are printed. Seeds are fixed so that a rerun gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

# Column titles of the Markdown tables, in display order; other keys follow in their own order.
COLUMN_TITLES = {
    "num_images": "images", "num_classes": "classes", "num_templates": "templates",
    "num_captions": "captions", "num_train": "train", "num_test": "test", "num_scenes": "scenes",
    "top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean per-class recall",
    "i2t_r1": "I→T R@1", "i2t_r5": "I→T R@5", "i2t_r10": "I→T R@10",
    "t2i_r1": "T→I R@1", "t2i_r5": "T→I R@5", "t2i_r10": "T→I R@10", "rsum": "RSUM",
    "localisation": "localisation", "other_object": "other object", "chance": "chance",
    "object_word_tokens": "object-word tokens",
}
TASK_TITLES = {"zeroshot": "Zero-shot classification (%)", "retrieval": "Image-text retrieval (%)",
               "linear_probe": "Linear probe (%)", "localisation": "Word-patch localisation (%)"}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `filip eval`."""
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by `filip train`")
    parser.add_argument("--zeroshot", type=Path, action="append", default=[], metavar="DIR",
                        help="ImageFolder dataset for zero-shot classification (repeatable)")
    parser.add_argument("--class-names", type=Path, action="append", default=[], metavar="FILE",
                        help="class names, one per line in sorted folder order; one per --zeroshot")
    parser.add_argument("--templates", type=Path, default=None,
                        help="prompt templates, one per line with {} (default: a CLIP-style set)")
    parser.add_argument("--zeroshot-similarity", choices=("i2t", "t2i", "mean"), default="i2t",
                        help="late-interaction direction used for FILIP zero-shot (default i2t)")
    parser.add_argument("--retrieval", type=Path, action="append", default=[], metavar="CSV",
                        help="caption file image,caption for retrieval (repeatable)")
    parser.add_argument("--images-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="images of each --retrieval file (default: images/ beside it)")
    parser.add_argument("--linear-probe", type=Path, default=None, metavar="DIR",
                        help="ImageFolder dataset for a linear probe (split by --probe-test-fraction)")
    parser.add_argument("--probe-test", type=Path, default=None, metavar="DIR",
                        help="separate ImageFolder test set for the linear probe")
    parser.add_argument("--probe-test-fraction", type=float, default=0.3)
    parser.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the probe")
    parser.add_argument("--localisation", type=int, default=0, metavar="N",
                        help="also score word-patch localisation on N generated scenes")
    parser.add_argument("--max-images", type=int, default=None, help="retrieval: first N images only")
    parser.add_argument("--max-per-class", type=int, default=None,
                        help="zero-shot and linear probe: first N images of each class only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for eval.json and eval.md")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pair(primary: list[Path], secondary: list[Path], flag: str) -> list[tuple[Path, Path | None]]:
    if secondary and len(secondary) != len(primary):
        raise UserError(f"{flag} must be given once per dataset ({len(primary)}), got {len(secondary)}")
    return list(zip(primary, secondary or [None] * len(primary)))


def _dataset_name(path: Path) -> str:
    return path.parent.name if path.is_file() or path.suffix == ".csv" else path.name


def evaluate_checkpoint(bundle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Runs every task requested in `args` on a loaded InferenceBundle; returns the results dict."""
    from filip.linear_probe import evaluate_linear_probe
    from filip.retrieval import evaluate_retrieval
    from filip.scenes import evaluate_localisation
    from filip.zeroshot import evaluate_zeroshot, load_templates

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    common = dict(device=args.device, batch_size=args.batch_size, progress=progress)
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "loss_kind": bundle.loss_kind,
                               "seed": args.seed}
    templates = load_templates(args.templates)
    for root, names in _pair(args.zeroshot, args.class_names, "--class-names"):
        started = time.perf_counter()
        _seed_everything(args.seed)
        results.setdefault("zeroshot", {})[_dataset_name(root)] = evaluate_zeroshot(
            bundle, root, templates, names, args.max_per_class, args.zeroshot_similarity, **common)
        log.info("zero-shot %s done in %.1f s", root, time.perf_counter() - started)
    for csv_path, images_dir in _pair(args.retrieval, args.images_dir, "--images-dir"):
        started = time.perf_counter()
        _seed_everything(args.seed)
        results.setdefault("retrieval", {})[_dataset_name(csv_path)] = evaluate_retrieval(
            bundle, csv_path, images_dir, args.max_images, **common)
        log.info("retrieval %s done in %.1f s", csv_path, time.perf_counter() - started)
    if args.linear_probe is not None:
        _seed_everything(args.seed)
        results["linear_probe"] = {_dataset_name(args.linear_probe): evaluate_linear_probe(
            bundle, args.linear_probe, args.probe_test, args.probe_test_fraction, args.max_per_class,
            args.probe_c, args.seed, **common)}
    if args.localisation:
        _seed_everything(args.seed)
        results["localisation"] = {"scenes": evaluate_localisation(
            bundle, args.localisation, seed=args.seed + 1234, device=args.device,
            batch_size=args.batch_size)}
    return results


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_markdown(results: dict[str, Any], label: str | None = None) -> str:
    """One Markdown table per task: a row per dataset, a column per metric."""
    label = label or f"{Path(results.get('checkpoint', '')).name} ({results.get('loss_kind', '?')})"
    parts: list[str] = []
    for task, title in TASK_TITLES.items():
        rows = results.get(task)
        if not rows:
            continue
        keys = list(next(iter(rows.values())))
        keys.sort(key=lambda k: list(COLUMN_TITLES).index(k) if k in COLUMN_TITLES else len(COLUMN_TITLES))
        header = ["model", "dataset"] + [COLUMN_TITLES.get(k, k) for k in keys]
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
                 "| " + " | ".join(["---"] * 2 + ["---:"] * len(keys)) + " |"]
        for dataset, metrics in rows.items():
            cells = [label, dataset] + [_cell(metrics.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Writes eval.json and eval.md atomically (temporary name, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("eval.json", json.dumps(results, indent=2) + "\n"),
                       ("eval.md", format_markdown(results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
        written.append(out_dir / name)
    return written[0], written[1]


def cli_main(args: argparse.Namespace) -> int:
    """Runs `filip eval`; returns the exit code."""
    import torch

    from filip.checkpoint import load_for_inference

    if not (args.zeroshot or args.retrieval or args.linear_probe or args.localisation):
        print("error: filip eval: nothing to do; give --zeroshot, --retrieval, --linear-probe or "
              "--localisation", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _seed_everything(args.seed)
    started = time.perf_counter()
    bundle = load_for_inference(args.checkpoint, device=args.device)
    bundle.model.to(args.device).eval()
    results = evaluate_checkpoint(bundle, args)
    results["seconds"] = round(time.perf_counter() - started, 2)
    print(format_markdown(results))
    if args.out is not None:
        json_path, md_path = write_results(results, args.out)
        print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m filip.evaluate`), the same as `filip eval`."""
    parser = argparse.ArgumentParser(prog="filip eval", description=__doc__)
    add_cli_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
