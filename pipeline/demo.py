"""`filip demo`: the whole job on a generated sample web served on 127.0.0.1."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(output: str = "demo-output", config_path: str | None = None, train: bool = True) -> int:
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.demo_web import generate_sample_web, write_url_list
    from pipeline.funnel import format_funnel
    from pipeline.testweb import serve_web

    start = time.perf_counter()
    out = Path(output).resolve()
    # The sample web's port changes every run, so a demo always starts from a clean folder.
    shutil.rmtree(out, ignore_errors=True)
    web = out.parent / f"{out.name}-web"
    shutil.rmtree(web, ignore_errors=True)
    rows = generate_sample_web(web / "files")
    config_file = Path(config_path) if config_path else REPO_CONFIG
    with serve_web(web / "files", slow_seconds=4.0) as base_url:
        write_url_list(rows, base_url, web / "urls.csv")
        config = load_config(config_file, {"run.input": str(web / "urls.csv"), "run.output": str(out)})
        print(f"demo: {len(rows) + 3} URLs on {base_url}, output in {out}")
        summary = build(config)
    print()
    print(format_funnel(summary))
    print(f"\ndemo: corpus built in {time.perf_counter() - start:.0f} s; output: {out}")
    return 0
