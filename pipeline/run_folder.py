"""The output folder of a build: which run it holds, and when a new config may take it over.

A folder belongs to the config recorded in `config.resolved.yaml`. The config is recorded only once
the config and the input have passed their checks, so a typo costs nothing. Until a per-shard stage
has completed a shard, nothing of value is in the folder: a corrected config replaces the old run.
After that, resuming with another config would mix two runs, and is refused with the keys that differ.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import yaml

from pipeline.config import PipelineConfig, RunConfig, dump_yaml
from pipeline.errors import UserError
from pipeline.storage import Storage, url_to_fs

CONFIG_FILE = "config.resolved.yaml"
# A resume may join another cluster; no other key may change.
RESUMABLE_KEYS = {"run.ray_address"}
# What a build writes at the top of its output folder: removed when a corrected config takes over a
# run that completed no shard (a partial shard of the old run must not reach the new run's report).
RUN_ENTRIES = ("input", "download", "inspect", "dedup", "unsafe", "backtranslate", "shards", "shards_parquet",
               "_shuffle", "decisions", "decisions.parquet", "stats.json", "manifest.json", CONFIG_FILE)
SHOWN_DIFFERENCES = 6
SHOWN_VALUE_CHARS = 60


class OutputInUse(UserError, RuntimeError):
    """The output folder holds a run made with another config that has completed work."""


def check_output_outside_input(run: RunConfig) -> None:
    """Refuse an output folder inside an input folder: a folder's files are all read as input,
    so the run's own Parquet files would become input rows of the next run."""
    from pipeline.input_read import InputError

    in_fs, in_path = url_to_fs(run.input)
    out_fs, out_path = url_to_fs(run.output)
    if in_fs.protocol != out_fs.protocol or not in_fs.isdir(in_path):
        return
    if in_fs.protocol in ("file", ("file", "local")):
        in_path, out_path = os.path.realpath(in_path), os.path.realpath(out_path)
    in_path, out_path = in_path.rstrip("/"), out_path.rstrip("/")
    if out_path == in_path or out_path.startswith(in_path + "/"):
        raise InputError(f"{run.output}: the output folder is inside the input folder {run.input}, whose "
                         "files are all read as input; choose an output folder outside it")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS - 3] + "..."


def config_differences(previous_yaml: str, current_yaml: str) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs, except those a resume may change."""
    try:
        old = _flatten(yaml.safe_load(previous_yaml) or {})
    except yaml.YAMLError:  # damaged by hand: it cannot be shown as keys, only as different
        return [f"{CONFIG_FILE}: not readable as YAML"]
    new = _flatten(yaml.safe_load(current_yaml) or {})
    absent = object()
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, absent), new.get(key, absent)
        if key not in RESUMABLE_KEYS and before != after:
            changed.append(f"{key}: {'(absent)' if before is absent else _show(before)} -> "
                           f"{'(absent)' if after is absent else _show(after)}")
    return changed


def completed_shards(storage: Storage) -> list[str]:
    """The completion markers of per-shard stages (`<stage>/NNNNN.done`; the input stage has none)."""
    return [rel for rel in storage.glob("*/[0-9]*.done") if not rel.startswith("input/")]


def claim_output(config: PipelineConfig, storage: Storage, progress: Callable[[str], None]) -> None:
    """Before any work: refuse a folder whose run used another config and completed a shard;
    forget such a run that completed none. The same config resumes."""
    if not storage.exists(CONFIG_FILE):
        return
    changed = config_differences(storage.read_bytes(CONFIG_FILE).decode(errors="replace"), dump_yaml(config))
    if not changed:
        return
    listed = "; ".join(changed[:SHOWN_DIFFERENCES])
    if len(changed) > SHOWN_DIFFERENCES:
        listed += f"; and {len(changed) - SHOWN_DIFFERENCES} more"
    done = completed_shards(storage)
    if done:
        stages = ", ".join(sorted({rel.split("/", 1)[0] for rel in done}))
        raise OutputInUse(
            f"{storage.full_url(CONFIG_FILE)}: this output folder holds a run made with another config "
            f"({listed}) whose stages completed shards ({stages}); resuming would mix the two. Use a "
            "new output folder, or restore the config.")
    progress(f"[output] the earlier run here completed no shard; it is replaced (config changed: {listed})")
    for entry in RUN_ENTRIES:
        storage.remove(entry, recursive=True)


def record_config(config: PipelineConfig, storage: Storage) -> None:
    """Write the resolved config beside the outputs, once the config and the input have passed."""
    if not storage.exists(CONFIG_FILE):
        storage.write_text(CONFIG_FILE, dump_yaml(config))
