"""The HTML statistics report of a build: one self-contained file a person opens to judge the filters.

Every number in the funnel comes from `stats.json` through `pipeline.funnel.load_summary`, the same
source as `filip stats` in the terminal, so the two always agree. Distributions are read from the
stages' row files, the gallery from `<stage>/samples/*.parquet`. Plots are matplotlib PNGs and
thumbnails JPEGs, all embedded as base64 data URIs so the file can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import io
from collections import Counter
from html import escape
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.funnel import load_summary
from pipeline.storage import Storage, write_file_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_FILES = 200  # files read per stage, evenly spaced, so a report on 300M rows stays minutes, not hours
GALLERY_PER_REASON = 8
DROP_COLOURS = {"dropped": "#d9822b", "failed": "#c23030"}

CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.reason td:first-child{padding-left:2em}
img.plot{max-width:100%}.note{color:#666}.missing{color:#a33}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.gallery-item{width:150px;font-size:.8em;margin:0}
.gallery-item img{width:128px;height:128px;object-fit:contain;background:#eee}"""
# Counts images that failed to decode once the page has loaded, for the headless-browser test.
BROKEN_IMAGES_SCRIPT = """window.addEventListener('load',function(){var b=0,i=document.images;
for(var k=0;k<i.length;k++){if(!i[k].complete||i[k].naturalWidth===0){b++;}}
document.body.dataset.brokenImages=String(b);document.body.dataset.images=String(i.length);});"""


def figure_to_data_uri(figure: Figure) -> str:
    """Render a matplotlib figure to a base64 PNG data URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure renders with the Agg canvas and never touches pyplot's global state or a GUI.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")  # constrained: long labels never overlap


def _img(uri: str, alt: str, element_id: str) -> str:
    return f'<img class="plot" id="{element_id}" alt="{escape(alt)}" src="{uri}">'


def _spread(files: list[str]) -> list[str]:
    if len(files) > MAX_FILES:
        step = len(files) / MAX_FILES
        files = [files[int(i * step)] for i in range(MAX_FILES)]
    return files


def read_columns(storage: Storage, stage: str, columns: list[str]) -> pa.Table | None:
    """The given columns of a stage's row files (those a file lacks are null); None without files."""
    tables = []
    for rel in _spread(storage.glob(f"{stage}/[0-9]*.parquet")):
        with storage.fs.open(storage.path(rel), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read(columns=present)
        for name in columns:
            if name not in present:
                table = table.append_column(name, pa.nulls(table.num_rows))
        tables.append(table.select(columns))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _funnel_section(summary: dict) -> str:
    stages = summary["stages"]
    rows = ["<tr><th>stage</th><th>rows in</th><th>rows out</th><th>count</th><th>share of rows in</th>"
            "<th>seconds</th></tr>"]
    bars: list[tuple[str, int, str]] = []
    for s in stages:
        name = s["stage"] + (" (skipped)" if s.get("skipped") else "")
        share = f"{100 * s['rows_out'] / s['rows_in']:.1f}%" if s["rows_in"] else "-"
        rows.append(f'<tr class="stage" data-stage="{escape(s["stage"])}" data-rows-in="{s["rows_in"]}" '
                    f'data-rows-out="{s["rows_out"]}"><td>{escape(name)}</td><td class="n">{s["rows_in"]:,}</td>'
                    f'<td class="n">{s["rows_out"]:,}</td><td></td><td class="n">{share}</td>'
                    f'<td class="n">{s["seconds"]:.1f}</td></tr>')
        for kind in ("dropped", "failed"):
            for reason, count in sorted(s[kind].items(), key=lambda kv: -kv[1]):
                share = f"{100 * count / s['rows_in']:.1f}%" if s["rows_in"] else "-"
                rows.append(f'<tr class="reason" data-stage="{escape(s["stage"])}" data-kind="{kind}" '
                            f'data-reason="{escape(reason)}" data-count="{count}"><td>{kind}: {escape(reason)}'
                            f'</td><td></td><td></td><td class="n">{count:,}</td><td class="n">{share}</td>'
                            f"<td></td></tr>")
                bars.append((f"{s['stage']}: {reason}", count, kind))
    if stages:
        first, last = stages[0]["rows_in"], stages[-1]["rows_out"]
        share = f"{100 * last / first:.1f}%" if first else "-"
        rows.append(f'<tr class="total" data-rows-in="{first}" data-rows-out="{last}"><th>kept overall</th>'
                    f'<td class="n">{first:,}</td><td class="n">{last:,}</td><td></td><td class="n">{share}</td>'
                    "<td></td></tr>")
    figure = _new_figure(12, 1.5 + 0.35 * max(len(stages), len(bars), 3))
    left, right = figure.subplots(1, 2)
    names = [s["stage"] for s in stages][::-1]  # barh draws bottom-up; the first stage belongs on top
    left.barh(names, [s["rows_in"] for s in stages][::-1], color="#c9d7e8", label="rows in")
    kept = left.barh(names, [s["rows_out"] for s in stages][::-1], color="#2b6cb0", label="rows out")
    left.bar_label(kept, fmt="{:,.0f}", padding=2, fontsize=8)
    left.set_title("rows per stage")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    if bars:
        drops = right.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1],
                           color=[DROP_COLOURS[b[2]] for b in bars][::-1])
        right.bar_label(drops, fmt="{:,.0f}", padding=2, fontsize=8)
        right.set_title("dropped (orange) and failed (red) per reason")
    else:
        right.text(0.5, 0.5, "nothing dropped or failed", ha="center", va="center")
        right.set_axis_off()
    chart = _img(figure_to_data_uri(figure), "funnel chart", "funnel-chart")
    return (f'<section id="funnel"><h2>Funnel</h2>{chart}<table id="funnel-table">{"".join(rows)}</table>'
            "</section>")


def _histogram(values: list[float], title: str, xlabel: str, element_id: str, log: bool = False,
               unit: str = "rows") -> str:
    figure = _new_figure(5, 3)
    axes = figure.subplots()
    if values:
        low, high = min(values), max(values)
        small_counts = isinstance(values[0], int) and high - low < 40
        # Small integer ranges (cluster sizes, word counts) get one bar per value, centred on it.
        bins = [b - 0.5 for b in range(int(low), int(high) + 2)] if small_counts else 40
        axes.hist(values, bins=bins, color="#2b6cb0", log=log, rwidth=0.85 if small_counts else None)
        if small_counts:
            from matplotlib.ticker import MaxNLocator

            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            axes.set_ylim(bottom=0.5)  # a count of one must still show as a bar on a log axis
    else:
        axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
    axes.set_title(f"{title} (n={len(values):,})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(unit)
    return _img(figure_to_data_uri(figure), title, element_id)


def valid_values(values: pa.Array | pa.ChunkedArray) -> list[float]:
    return [v for v in pc.drop_null(values).to_pylist() if v == v]  # v == v drops NaN


def _distributions_section(storage: Storage) -> str:
    plots, note = [], ""
    sizes = read_columns(storage, "download", ["original_width", "original_height", "caption"])
    if sizes is None:
        note = _missing_note("download (original sizes, caption length)")
    else:
        # Failed downloads have no size; only images that arrived tell the size distribution.
        ok = sizes.filter(pc.and_(pc.is_valid(sizes["original_width"]), pc.is_valid(sizes["original_height"])))
        widths, heights = valid_values(ok["original_width"]), valid_values(ok["original_height"])
        aspects = [w / h for w, h in zip(widths, heights) if h]
        words = pc.list_value_length(pc.utf8_split_whitespace(pc.fill_null(sizes["caption"].cast(pa.string()), "")))
        plots += [_histogram(widths, "original width", "pixels", "hist-width"),
                  _histogram(heights, "original height", "pixels", "hist-height"),
                  _histogram(aspects, "aspect ratio", "width / height", "hist-aspect"),
                  _histogram(valid_values(words), "caption length", "words (split on whitespace)", "hist-caption")]
    shards = len(storage.glob("download/[0-9]*.parquet"))
    if shards > MAX_FILES:
        note += f'<p class="note">Histograms read {MAX_FILES} of {shards:,} shards, evenly spaced.</p>'
    return f'<section id="distributions"><h2>Distributions</h2>{note}{"".join(plots)}</section>'


def _missing_note(what: str) -> str:
    return f'<p class="missing">No row files for stage {escape(what)}.</p>'


def histogram_section(stage: str, title: str, values: list[float] | None, plot_title: str, xlabel: str,
                      element_id: str, log: bool = False, unit: str = "rows") -> str:
    """A stage's report section holding one histogram (`values` None: the stage wrote no rows)."""
    body = _missing_note(f"{stage} ({plot_title})") if values is None else _histogram(
        values, plot_title, xlabel, element_id, log=log, unit=unit)
    return f'<section id="stage-{escape(stage)}"><h2>{escape(title)}</h2>{body}</section>'



def _stage_sections(storage: Storage, summary: dict) -> list[str]:
    """The sections the registered stages add: those of this run's stages and of the default ones
    (so that a default stage switched off says so)."""
    from pipeline.config import DEFAULT_STAGES
    from pipeline.registry import registered_stages

    names = list(dict.fromkeys([s["stage"] for s in summary["stages"]] + list(DEFAULT_STAGES)))
    specs = registered_stages()
    return [specs[n].report(storage, summary) for n in names if n in specs and specs[n].report]


def _timings_section(summary: dict) -> str:
    # The stages, then the steps after them (decisions, final shards): every second of the build.
    stages = summary["stages"] + summary.get("steps", [])
    figure = _new_figure(7, 0.8 + 0.35 * max(len(stages), 3))
    axes = figure.subplots()
    axes.barh([s["stage"] for s in stages][::-1], [s["seconds"] for s in stages][::-1], color="#2b6cb0")
    axes.set_xlabel("seconds (summed over shards and workers)")
    rows = "".join(f"<tr><td>{escape(s['stage'])}</td><td class='n'>{s['seconds']:.1f}</td></tr>" for s in stages)
    chart = _img(figure_to_data_uri(figure), "stage timings", "timings-chart")
    return (f'<section id="timings"><h2>Stage timings</h2>{chart}'
            f'<table id="timings-table"><tr><th>stage</th><th>seconds</th></tr>{rows}</table></section>')


def _gallery_section(storage: Storage, summary: dict) -> str:
    samples: dict[tuple[str, str], list[dict]] = {}
    files = [f for s in summary["stages"] for f in _spread(storage.glob(f"{s['stage']}/samples/*.parquet"))]
    for rel in files:
        for row in storage.read_parquet(rel).to_pylist():
            samples.setdefault((row["stage"], row["reason"]), []).append(row)
    # Every reason of the funnel gets a heading, so a reason without thumbnails says so.
    reasons = [(s["stage"], r) for s in summary["stages"] for k in ("dropped", "failed") for r in s[k]]
    reasons += [key for key in sorted(samples) if key not in reasons]
    parts = []
    for stage, reason in reasons:
        items = []
        for row in samples.get((stage, reason), [])[:GALLERY_PER_REASON]:
            thumb = row.get("thumbnail")
            picture = (f'<img alt="thumbnail {escape(str(row.get("key")))}" src="data:image/jpeg;base64,'
                       f'{base64.b64encode(thumb).decode("ascii")}">' if thumb else '<p class="note">no thumbnail</p>')
            caption = escape(row.get("caption") or "")
            items.append(f'<figure class="gallery-item" data-reason="{escape(reason)}">{picture}<figcaption>'
                         f'<b>{escape(reason)}</b> · {escape(str(row.get("key")))}<br>{caption}</figcaption></figure>')
        body = f'<div class="gallery">{"".join(items)}</div>' if items else '<p class="note no-samples">no samples</p>'
        parts.append(f'<h3 data-stage="{escape(stage)}" data-reason="{escape(reason)}">{escape(stage)}: '
                     f"{escape(reason)}</h3>{body}")
    return f'<section id="gallery"><h2>Dropped samples</h2>{"".join(parts) or "<p>no samples</p>"}</section>'


def _sources_section(storage: Storage, summary: dict) -> str:
    notes = []
    for s in summary["stages"]:
        if not s.get("skipped") and s["stage"] != "input" and not storage.glob(f"{s['stage']}/[0-9]*.parquet"):
            notes.append(f"stage {s['stage']}: no row files (disabled or unfinished)")
    status = _decision_statuses(storage, summary)
    if status is not None:
        counts = ", ".join(f"{name}: {n:,}" for name, n in status.most_common())
        decisions = f'<p id="decisions">decisions/: {escape(counts)}</p>'
    else:
        decisions = ""
        notes.append("decisions/: missing (run unfinished?)")
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    missing = f'<ul id="missing" class="missing">{items}</ul>' if notes else ""
    return f'<section id="sources"><h2>Data</h2><p>Output: {escape(storage.url)}</p>{decisions}{missing}</section>'


def _decision_statuses(storage: Storage, summary: dict) -> Counter | None:
    """Rows per status: from the decisions step of stats.json, or counted in the files (a run of an
    earlier version); None when the run wrote no decisions."""
    from pipeline.decisions import STEP, decision_files

    step = next((s for s in summary.get("steps", []) if s["stage"] == STEP), None)
    if step is not None:
        return Counter(step["counters"])
    files = decision_files(storage)
    if not files:
        return None
    status: Counter = Counter()
    for rel in files:
        status.update(storage.read_parquet(rel, columns=["status"])["status"].to_pylist())
    return status


def write_html_report(output: str, html_path: str) -> None:
    """Write the statistics report of the build in `output` to `html_path` as one self-contained file."""
    storage = Storage(output)
    summary = load_summary(output)
    sections = [_sources_section(storage, summary), _funnel_section(summary), _distributions_section(storage),
                *_stage_sections(storage, summary), _timings_section(summary), _gallery_section(storage, summary)]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Build report</title>'
            f"<style>{CSS}</style><script>{BROKEN_IMAGES_SCRIPT}</script></head><body>"
            f'<h1>Build report</h1>{"".join(sections)}</body></html>\n')
    write_file_atomically(html_path, page.encode("utf-8"))  # a reader never sees half a report
