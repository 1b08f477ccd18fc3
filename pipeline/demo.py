"""`filip demo`: the whole job on a generated sample web served on 127.0.0.1.

Builds the corpus with every stage (download, inspect, dedup, unsafe, back-translation with tiny
random-weight MarianMT models built on the spot, final shards and tokenizer), prints the terminal
statistics and writes the HTML report, then trains the tiny FILIP model on the shards for a few
steps and prints its evaluation (zero-shot, retrieval, word-patch localisation) as a table.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPO_CONFIG = CONFIGS / "demo.yaml"
TRAIN_CONFIG = CONFIGS / "train-tiny.yaml"


def _build_tiny_translation_models(folder: Path, captions: list[str]) -> dict[str, str]:
    from filters.backtranslation.tiny_models import build_tiny_marian_models

    print(f"demo: building tiny random-weight MarianMT models in {folder} (no model hub here)")
    return build_tiny_marian_models(folder, captions)


def build_demo_corpus(out: Path, config_path: str | None = None,
                      overrides: dict[str, Any] | None = None) -> dict:
    """Build the corpus of the sample web; `overrides` (dotted keys, as `--set`) apply to the config."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.demo_web import generate_sample_web, write_url_list
    from pipeline.funnel import format_funnel
    from pipeline.report import write_html_report
    from pipeline.testweb import serve_web

    start = time.perf_counter()
    config_file = Path(config_path) if config_path else REPO_CONFIG
    # A mistake in the config or a --set fails here, before the sample web and models are made.
    load_config(config_file, {**(overrides or {}), "run.input": "urls.csv", "run.output": str(out)})
    # The sample web's port changes every run, so a demo always starts from a clean folder.
    shutil.rmtree(out, ignore_errors=True)
    web = out.parent / f"{out.name}-web"
    shutil.rmtree(web, ignore_errors=True)
    rows = generate_sample_web(web / "files")
    models = _build_tiny_translation_models(web / "models", [r["caption"] for r in rows])
    with serve_web(web / "files", slow_seconds=4.0) as base_url:
        write_url_list(rows, base_url, web / "urls.csv")
        # The user's overrides first: the sample web's list, the output and the tiny models win.
        settings = {**(overrides or {}), "run.input": str(web / "urls.csv"), "run.output": str(out)}
        settings.update({f"backtranslation.models.{d}": p for d, p in models.items()})
        config = load_config(config_file, settings)
        print(f"demo: {len(rows) + 3} URLs on {base_url}, output in {out}")
        summary = build(config)
    print()
    print(format_funnel(summary))
    report = out / "report.html"
    write_html_report(str(out), str(report))
    print(f"\ndemo: corpus built in {time.perf_counter() - start:.0f} s; output: {out}")
    print(f"demo: HTML report: {report}")
    return summary


def train_and_evaluate(out: Path, steps: int) -> None:
    from filip.checkpoint import latest_checkpoint
    from filip.evaluate import main as evaluate_main
    from filip.trainer import main as train_main
    from pipeline.demo_web import write_eval_sets

    start = time.perf_counter()
    run_dir = out / "train-tiny"
    print(f"\ndemo: training the tiny FILIP model for {steps} steps on {out / 'shards'}")
    train_main([str(TRAIN_CONFIG), "--set", f"data.shards={out / 'shards'}",
                "--set", f"run.output_dir={run_dir}", "--set", f"run.max_steps={steps}",
                "--set", f"run.checkpoint_every={steps}"])
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint in {run_dir}")
    sets = write_eval_sets(out.parent / f"{out.name}-web" / "eval")
    print(f"demo: trained in {time.perf_counter() - start:.0f} s; evaluating {checkpoint}\n")
    evaluate_main([str(checkpoint), "--zeroshot", str(sets["zeroshot"]), "--retrieval", str(sets["retrieval"]),
                   "--localisation", "50", "--device", "cpu", "--out", str(out / "eval")])


def run_demo(output: str = "demo-output", config_path: str | None = None, train: bool = True,
             steps: int = 60, overrides: dict[str, Any] | None = None) -> int:
    out = Path(output).resolve()
    build_demo_corpus(out, config_path, overrides)
    if train:
        train_and_evaluate(out, steps)
    return 0
