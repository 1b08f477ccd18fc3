"""`filip demo` end to end: every stage, the report, a few training steps and the evaluation."""
from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq

from pipeline.demo import run_demo


def test_demo_builds_trains_and_evaluates(tmp_path, ray_session, capsys) -> None:
    out = tmp_path / "demo-output"
    assert run_demo(str(out), steps=3) == 0
    printed = capsys.readouterr().out
    assert "kept overall" in printed and f"HTML report: {out / 'report.html'}" in printed
    assert "### Zero-shot classification" in printed and "### Image-text retrieval" in printed

    # The sample web says what should happen to each URL; every row ends exactly so.
    expected = list(csv.DictReader((tmp_path / "demo-output-web" / "urls.csv").open()))
    decisions = pq.read_table(out / "decisions").sort_by("row_id").to_pylist()
    assert len(decisions) == len(expected)
    assert [d["reason"] or d["status"] for d in decisions] == [e["expect"] for e in expected]

    stats = json.loads((out / "stats.json").read_text())
    assert [s["stage"] for s in stats["stages"]] == ["input", "caption_language", "download", "inspect",
                                                    "dedup", "unsafe", "backtranslate"]
    assert not any(s["skipped"] for s in stats["stages"])
    # The demo's few hundred rows are searched in the driver (the pipeline tests run the shuffle).
    dedup = next(s for s in stats["stages"] if s["stage"] == "dedup")
    assert dedup["counters"]["search_in_driver"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.model" and (out / "shards" / "tokenizer.model").exists()
    assert manifest["total_samples"] == sum(e["expect"] == "kept" for e in expected)
    assert (out / "report.html").stat().st_size > 10_000
    results = json.loads((out / "eval" / "eval.json").read_text())
    assert results["zeroshot"]["zeroshot"]["num_images"] == 70
    assert results["retrieval"]["retrieval"]["num_images"] == 60
