"""The funnel of a run in the terminal: rows per stage and every drop or failure reason."""
from __future__ import annotations

import json

from pipeline.storage import Storage

WIDTH = 78


def load_summary(output: str) -> dict:
    storage = Storage(output)
    if not storage.exists("stats.json"):
        raise FileNotFoundError(f"{storage.full_url('stats.json')}: no statistics yet (has `filip build` run?)")
    return storage.read_json("stats.json")


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def format_funnel(summary: dict) -> str:
    """An 80-column table: stage, rows in, rows out, then one line per reason with count and share."""
    lines = [f"{'stage':<22}{'in':>12}{'out':>12}{'kept':>8}{'seconds':>10}", "-" * WIDTH]
    first_in = summary["stages"][0]["rows_in"] if summary["stages"] else 0
    for stage in summary["stages"]:
        name = stage["stage"] + (" (skipped)" if stage.get("skipped") else "")
        lines.append(f"{name:<22}{stage['rows_in']:>12,}{stage['rows_out']:>12,}"
                     f"{_pct(stage['rows_out'], stage['rows_in']):>8}{stage['seconds']:>10.1f}")
        for kind in ("dropped", "failed"):
            for reason, count in sorted(stage[kind].items(), key=lambda kv: -kv[1]):
                label = f"  {kind}: {reason}"
                lines.append(f"{label[:46]:<46}{count:>12,}{_pct(count, stage['rows_in']):>8}")
        for name, value in sorted(stage.get("counters", {}).items()):
            label = f"  counter: {name}"
            lines.append(f"{label[:46]:<46}{value:>12,}")
    if summary["stages"]:
        last = summary["stages"][-1]["rows_out"]
        lines.append("-" * WIDTH)
        lines.append(f"{'kept overall':<22}{first_in:>12,}{last:>12,}{_pct(last, first_in):>8}")
    # The steps after the stages (decisions, final shards) take time but drop nothing.
    for step in summary.get("steps", []):
        lines.append(f"{'step: ' + step['stage']:<22}{step['rows_in']:>12,}{step['rows_out']:>12,}"
                     f"{'':>8}{step['seconds']:>10.1f}")
        for name, value in sorted(step.get("counters", {}).items()):
            label = f"  {name}"
            lines.append(f"{label[:46]:<46}{value:>12,}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(format_funnel(json.load(open(sys.argv[1]))))
