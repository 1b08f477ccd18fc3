"""The HTML report (`pipeline/report.py`): its numbers agree with `filip stats`, it renders with a
stage missing, and it reads well in a real browser (headless Chromium: screenshot, no broken image).

The output folder is written by hand with the on-disk schemas of a build, so no pipeline runs here.
"""
from __future__ import annotations

import io
import json
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from pipeline.cli import main
from pipeline.funnel import format_funnel, load_summary
from pipeline.report import write_html_report

SHARDS = 3
ROWS_PER_SHARD = 20
IDS = ["funnel-table", "funnel-chart", "hist-width", "hist-height", "hist-aspect", "hist-caption",
       "hist-unsafe", "hist-cluster", "bt-hit-rate", "timings-chart", "gallery"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _jpeg(seed: int) -> bytes:
    """A small, visibly non-blank JPEG (a coloured block on a gradient), as the stage's thumbnail()."""
    image = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    image.paste((40 * seed % 255, 90, 200), (10, 10, 50, 40))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def _stage(name: str, rows_in: int, reasons: list[str | None], kind: str, seconds: float,
           counters: dict[str, int] | None = None) -> dict:
    dropped: dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
    kept = reasons.count(None)
    return {"stage": name, "rows_in": rows_in, "rows_out": kept, "dropped": dropped if kind == "dropped" else {},
            "failed": dropped if kind == "failed" else {}, "seconds": seconds, "counters": counters or {},
            "shards": SHARDS, "skipped": False}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def build_output(root: Path) -> Path:
    """A finished build's output folder: stats.json, stage row files, samples and decisions."""
    rng = random.Random(5)
    n = SHARDS * ROWS_PER_SHARD
    keys = [f"{i // ROWS_PER_SHARD:05d}{i % ROWS_PER_SHARD:04d}" for i in range(n)]
    captions = [" ".join(rng.choice(["a", "dog", "red", "on", "the", "beach"]) for _ in range(rng.randint(2, 14)))
                for _ in range(n)]
    failed = {i for i in range(n) if i % 17 == 3}  # http_404 at download
    small = {i for i in range(n) if i % 11 == 5 and i not in failed}  # too_small at inspect
    dup_of = {i: i - 1 for i in range(n) if i % 4 == 1 and i not in failed | small and i - 1 not in failed | small}
    size = {i: (rng.choice([120, 640, 800, 1024]), rng.choice([90, 480, 600, 768])) for i in range(n)}
    stages, decisions = [], []
    reasons = {"download": [], "inspect": [], "dedup": [], "unsafe": [], "backtranslate": []}
    for shard in range(SHARDS):
        part = range(shard * ROWS_PER_SHARD, (shard + 1) * ROWS_PER_SHARD)
        download = [{"key": keys[i], "caption": captions[i], "status": "error" if i in failed else "success",
                     "original_width": None if i in failed else size[i][0],
                     "original_height": None if i in failed else size[i][1]} for i in part]
        inspect = [dict(r, phash=i, drop_reason="too_small" if i in small else None)
                   for i, r in zip(part, download) if r["status"] == "success"]
        dedup = [{"key": keys[i], "caption": captions[i], "duplicate_of": keys[dup_of[i]] if i in dup_of else None,
                  "cluster_size": 2 if i in dup_of or i + 1 in dup_of else 1,
                  "drop_reason": "exact_duplicate" if i in dup_of else None}
                 for i in part if i not in failed | small]
        unsafe = [{"key": r["key"], "unsafe_score": rng.random() * 0.3, "drop_reason": None}
                  for r in dedup if r["drop_reason"] is None]
        bt = [{"key": r["key"], "caption_bt_de": "x", "caption_bt_ru": "y", "drop_reason": None} for r in unsafe]
        for name, rows in (("download", download), ("inspect", inspect), ("dedup", dedup), ("unsafe", unsafe),
                           ("backtranslate", bt)):
            _write(root / name / f"{shard:05d}.parquet", rows)
            reasons[name] += [None if name == "download" and r["status"] == "success" else
                              "http_404" if name == "download" else r["drop_reason"] for r in rows]
        for name, reason, picked in (("dedup", "exact_duplicate", dup_of), ("inspect", "too_small", small)):
            samples = [{"key": keys[i], "caption": captions[i], "stage": name, "reason": reason,
                        "thumbnail": _jpeg(i)} for i in part if i in picked][:2]
            if samples:  # as the stage does: a shard without drops writes no samples file
                _write(root / name / "samples" / f"{shard:05d}.parquet", samples)
    rows_in = n
    for name, kind, seconds in (("download", "failed", 30.5), ("inspect", "dropped", 4.2),
                                ("dedup", "dropped", 12.0), ("unsafe", "dropped", 8.8),
                                ("backtranslate", "dropped", 21.4)):
        counters = {"cache_hits": 9, "cache_misses": 21, "fallback_empty": 2, "fallback_too_long": 1} \
            if name == "backtranslate" else None
        stages.append(_stage(name, rows_in, reasons[name], kind, seconds, counters))
        rows_in = stages[-1]["rows_out"]
    stages.insert(0, {"stage": "input", "rows_in": n + 2, "rows_out": n, "dropped": {"empty_url": 2},
                      "failed": {}, "seconds": 0.1, "counters": {}, "shards": SHARDS, "skipped": False})
    (root / "stats.json").write_text(json.dumps({"stages": stages, "shards": [f"{s:05d}" for s in range(SHARDS)],
                                                 "final_shards": {"shards": 1, "samples": rows_in}}))
    for i in range(n):
        status = "failed_download" if i in failed else "dropped" if i in small or i in dup_of else "kept"
        decisions.append({"row_id": i, "key": keys[i], "url": f"https://example.com/{i}.jpg", "caption": captions[i],
                          "status": status, "stage": None, "reason": None, "duplicate_of": None})
    _write(root / "decisions.parquet", decisions)
    return root


class _Collector(HTMLParser):
    """Every element's attributes and the text of each table row, enough to read the report back."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.rows: list[tuple[dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == "tr":
            self.rows.append((attributes, []))
        elif tag in ("td", "th") and self.rows:
            self.rows[-1][1].append("")

    def handle_data(self, data: str) -> None:
        if self.rows and self.rows[-1][1]:
            self.rows[-1][1][-1] += data


def _parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    output = build_output(tmp_path_factory.mktemp("build"))
    html = output.parent / "report.html"
    write_html_report(str(output), str(html))
    return output, html


def test_funnel_table_agrees_with_terminal(report: tuple[Path, Path]) -> None:
    output, html = report
    summary = load_summary(str(output))
    terminal = format_funnel(summary).splitlines()
    rows = _parse(html.read_text()).rows
    stage_rows = {a["data-stage"]: cells for a, cells in rows if a.get("class") == "stage"}
    assert list(stage_rows) == [s["stage"] for s in summary["stages"]]
    for stage in summary["stages"]:
        cells = stage_rows[stage["stage"]]
        line = next(t for t in terminal if t.split()[0] == stage["stage"])
        # The same formatted numbers as the terminal line, in the same order.
        assert [cells[1], cells[2]] == line.split()[1:3] == [f"{stage['rows_in']:,}", f"{stage['rows_out']:,}"]
    reason_rows = {(a["data-stage"], a["data-kind"], a["data-reason"]): int(a["data-count"])
                   for a, _ in rows if a.get("class") == "reason"}
    expected = {(s["stage"], kind, r): n for s in summary["stages"] for kind in ("dropped", "failed")
                for r, n in s[kind].items()}
    assert reason_rows == expected and expected[("download", "failed", "http_404")] == 4
    total = next(cells for a, cells in rows if a.get("class") == "total")
    assert total[1:3] == terminal[-1].split()[2:4]  # "kept overall IN OUT SHARE"


def test_report_sections_and_self_contained(report: tuple[Path, Path]) -> None:
    _, html = report
    text = html.read_text()
    elements = _parse(text).elements
    ids = {a.get("id") for _, a in elements}
    assert set(IDS) <= ids
    sources = [a["src"] for tag, a in elements if tag in ("img", "script") and "src" in a]
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not any(tag == "link" for tag, _ in elements)
    gallery = [a for tag, a in elements if "gallery-item" in a.get("class", "")]
    assert {a["data-reason"] for a in gallery} == {"exact_duplicate", "too_small"}
    assert text.count("no samples") == 2  # input: empty_url and download: http_404 have no thumbnails
    assert "failed_download: 4" in text  # decisions.parquet's statuses, beside the funnel
    assert 'data-hits="9" data-misses="21"' in text and "30.0%" in text and "fallback_too_long" in text


def test_report_renders_with_stages_missing(tmp_path: Path) -> None:
    output = build_output(tmp_path / "out")
    shutil.rmtree(output / "dedup")
    shutil.rmtree(output / "unsafe")
    (output / "decisions.parquet").unlink()
    summary = json.loads((output / "stats.json").read_text())
    summary["stages"][-1].update(skipped=True, counters={})
    (output / "stats.json").write_text(json.dumps(summary))
    html = tmp_path / "report.html"
    write_html_report(str(output), str(html))
    text = html.read_text()
    assert "stage dedup: no row files" in text and "stage unsafe: no row files" in text
    assert "decisions/: missing" in text and "back-translation stage was skipped" in text
    assert 'id="hist-width"' in text and 'id="hist-cluster"' not in text
    assert text.count("no samples") == 3  # dedup's samples went with its folder; inspect's remain


def test_report_reads_object_store_output(report: tuple[Path, Path], tmp_path: Path) -> None:
    """Through fsspec, as for s3:// or gs://: fsspec's in-memory filesystem stands in for the bucket."""
    import fsspec

    output, local = report
    memory = fsspec.filesystem("memory")
    memory.put(str(output), "/report-test-build", recursive=True)
    try:
        html = tmp_path / "remote.html"
        write_html_report("memory://report-test-build", str(html))
    finally:
        memory.rm("/report-test-build", recursive=True)
    assert _parse(html.read_text()).rows == _parse(local.read_text()).rows
    assert html.read_text().count("gallery-item") == local.read_text().count("gallery-item") > 0


def test_cli_stats_writes_report(report: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    output, _ = report
    html = tmp_path / "cli.html"
    assert main(["stats", str(output), "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    assert format_funnel(load_summary(str(output))) in printed and str(html) in printed
    assert 'id="funnel-table"' in html.read_text()


def _chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *flags, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: run scripts/install-chromium.sh as root "
                                              "(Debian's `chromium` package) to render the report")
def test_report_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    _, html = report
    shot = tmp_path / "report.png"
    _chromium(html, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,4000")
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        # A blank or failed page is one flat colour; the report's text, tables and plots are not.
        assert ImageStat.Stat(image.convert("L")).stddev[0] > 20
    dom = _chromium(html, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000").stdout
    images = len(re.findall(r"<img\b", html.read_text()))
    assert 'data-broken-images="0"' in dom and f'data-images="{images}"' in dom
    assert all(f'id="{i}"' in dom for i in IDS)
    # The check itself sees a broken image: one thumbnail with bytes that are not a JPEG.
    broken = tmp_path / "broken.html"
    broken.write_text(html.read_text().replace("data:image/jpeg;base64,", "data:image/jpeg;base64,AAAA", 1))
    dom = _chromium(broken, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000").stdout
    assert 'data-broken-images="1"' in dom
