"""`filip build` as a measured command, for the whole-command benchmarks: the config it runs, and
its phases read from its progress lines and from the run's stats.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from proctree import CommandRun, run_measured

FILIP = str(Path(sys.executable).parent / "filip")
RAY_PROCESS = "raylet"  # Ray logs nothing when it has started; its raylet's process appearing marks it


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def _keep(line: str) -> bool:
    return line.startswith("[")  # the build's progress lines, "[stage] ...", cut the run into phases


def phases(run: CommandRun) -> dict[str, float]:
    """Seconds of each phase of one build, cut at the progress lines' times.

    `start_to_input`: the command's start to the `[input]` line (imports, config, input shards);
    `ray_start`: from there until the raylet's process was first sampled (Ray's start up to its
    raylet; the driver's connection after it counts in the next phase); then one phase per group
    of stages that run together (the build's `[stages] a+b: ...` line starts it: their shards
    flow from stage to stage on the same actors, so they have no separate times), and one per
    other progress tag (decisions, shards), each from the previous boundary to its last line;
    `after_last_line`: the last line to the command's exit (writing stats.json, Ray's shutdown,
    the interpreter's exit). The phases add up to the wall clock.
    """
    last: dict[str, float] = {}
    first_input, ray_started = None, run.first_seen.get(RAY_PROCESS)
    group: list[str] = []  # the stages of the latest `[stages]` line
    for seconds, line in run.lines:
        tag = line[1:].split("]", 1)[0]
        if tag == "stages":
            label = line.split("]", 1)[1].strip().split(":", 1)[0]
            group = label.split("+")
            last[label] = seconds
            continue
        phase = "+".join(group) if tag in group else tag
        last[phase] = seconds
        if tag == "input" and first_input is None:
            first_input = seconds
    out: dict[str, float] = {}
    boundary = 0.0
    if first_input is not None:
        out["start_to_input"] = boundary = first_input
    if ray_started is not None and ray_started >= boundary:
        out["ray_start"] = ray_started - boundary
        boundary = ray_started
    for tag, seconds in sorted(last.items(), key=lambda item: item[1]):
        if tag == "input":
            continue
        out[tag] = max(0.0, seconds - boundary)
        boundary = max(boundary, seconds)
    out["after_last_line"] = run.wall_seconds - boundary
    return {name: round(value, 2) for name, value in out.items()}


def phase_cpu(run: CommandRun) -> dict[str, float]:
    """The tree's sampled CPU seconds in each phase of `phases` (same windows)."""
    out, boundary = {}, 0.0
    for name, seconds in phases(run).items():
        out[name] = round(run.cpu_between(boundary, boundary + seconds), 2)
        boundary += seconds
    return out


def stage_stats(output: Path) -> dict[str, dict]:
    """Per stage from stats.json: rows in and out, and `seconds` (the sum of its shards' seconds,
    which overlap when shards run in parallel); per step (decisions, final shards) its seconds."""
    summary = json.loads((output / "stats.json").read_text())
    stages = {s["stage"]: {"rows_in": s["rows_in"], "rows_out": s["rows_out"],
                           "shard_seconds": round(s.get("seconds", 0.0), 2), "skipped": s.get("skipped", False)}
              for s in summary["stages"]}
    steps = {s["stage"]: {"seconds": round(s.get("seconds", 0.0), 2)} for s in summary.get("steps", [])}
    return {"stages": stages, "steps": steps}


def run_build(config: Path, work: Path, timeout: float = 3600.0) -> CommandRun:
    """`filip build CONFIG` from start to exit, its log in `work/filip-build.log`."""
    run = run_measured([FILIP, "build", str(config)], work / "filip-build.log", keep=_keep, timeout=timeout)
    if run.returncode != 0:
        tail = (work / "filip-build.log").read_text()[-3000:]
        raise RuntimeError(f"filip build exited {run.returncode}:\n{tail}")
    return run
