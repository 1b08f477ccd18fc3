"""Images per second per core of inspect_image, the caption filter and the unsafe scorer, and the
unsafe scorer's false positive rate on the benign Flickr8k photos at several thresholds.

Single process; CPU seconds (process time) divide the work so that other load on the machine does
not count. Prints one JSON line.

    .venv/bin/python bench/filters_throughput.py --images ../shared/data/flickr8k-1k/images
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from filters.caption import CaptionFilter
from filters.image import inspect_image
from filters.unsafe import UnsafeFilterConfig, UnsafeScorer

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


FLICKR_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k" / "images"

def _rate(count: int, seconds: float, cpu: float) -> dict:
    return {"items": count, "wall_seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "items_per_cpu_second": round(count / max(cpu, 1e-9), 1)}


def _timed(function) -> tuple[object, float, float]:
    start, cpu_start = time.perf_counter(), time.process_time()
    value = function()
    return value, time.perf_counter() - start, time.process_time() - cpu_start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, default=FLICKR_IMAGES)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--onnx-threads", type=int, default=1, help="intra-op threads (1 = per core)")
    args = parser.parse_args(argv)
    bodies = [path.read_bytes() for path in sorted(args.images.glob("*.jpg"))[: args.limit]]
    with open(args.images.parent / "captions.csv", newline="") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)]

    _, wall, cpu = _timed(lambda: [inspect_image(body) for body in bodies])
    report = {"bench": "filters_throughput", "inspect_image": _rate(len(bodies), wall, cpu)}
    caption_filter = CaptionFilter()
    reasons, wall, cpu = _timed(lambda: [caption_filter.reason(text) for text in captions])
    report["caption_filter"] = _rate(len(captions), wall, cpu)
    report["caption_filter"]["dropped"] = sum(reason is not None for reason in reasons)

    import onnxruntime

    scorer = UnsafeScorer(UnsafeFilterConfig())
    scorer.setup()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.onnx_threads
    # Rebuild the session with a fixed thread count so the rate is per core.
    scorer._session = onnxruntime.InferenceSession(scorer._session._model_path, options,
                                                   providers=scorer.providers)
    scores, wall, cpu = _timed(lambda: scorer.score_batch(bodies))
    report["unsafe_scorer"] = {**_rate(len(bodies), wall, cpu), "providers": scorer.providers,
                               "onnx_threads": args.onnx_threads}
    scores = np.asarray(scores)
    report["unsafe_false_positive_rate"] = {
        str(threshold): round(float((scores >= threshold).mean()), 4) for threshold in THRESHOLDS}
    report["unsafe_score_max"] = round(float(scores.max()), 4)
    report["unsafe_score_p99"] = round(float(np.percentile(scores, 99)), 4)
    report["unsafe_nonzero"] = int((scores > 0).sum())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
