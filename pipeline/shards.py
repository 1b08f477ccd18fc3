"""The final training shards: the driver's part. Plans the deterministic shuffle of
`pipeline/shuffle.py`, runs what is missing, writes `sizes.json` and the manifest.

The driver holds counts per stage shard and per final shard, never rows. N final shards =
ceil(kept rows / samples_per_shard). A final shard whose `shards/_NNNNN.done` marker exists is not
written again; a resumed run writes the others, and they equal those of an uninterrupted run. A
small run (up to `DRIVER_MAX_ROWS` kept rows) is cut in the driver: no Ray work to schedule.
"""
from __future__ import annotations

import hashlib
import math
import time
from importlib import metadata
from typing import Callable

from pipeline.schema import CAPTION_COLUMNS
from pipeline.shuffle import FOLDER, PARQUET_FOLDER, PARTS, done_marker, map_group, reduce_bucket
from pipeline.stage import shard_name
from pipeline.stats import StageStats
from pipeline.storage import Storage

STEP = "shards"
LIBRARIES = ("img2dataset", "ray", "pyarrow", "imagehash", "nudenet", "onnxruntime", "transformers",
             "sentencepiece", "torch", "webdataset")
# filip.tokenizer.DEFAULT_NAME, where the trainer looks beside the shards (not imported here:
# that module imports torch).
TOKENIZER_NAME = "tokenizer.model"
SIZES_NAME = "sizes.json"  # open_clip's {"00000.tar": samples, ...}: no --train-num-samples needed
# One default shard: no parallelism to gain, and the driver saves the first Ray task's ~2.5 s of
# worker start; from two shards on, tasks in parallel win (bench/small_steps.py, docs/SCALING.md).
DRIVER_MAX_ROWS = 10_000
ROWS_PER_TASK = 500_000  # rows a map or reduce task holds at most (~0.5 GB of metadata)


def train_shard_tokenizer(storage: Storage, names: list[str], vocab_size: int, max_sentences: int,
                          progress: Callable[[str], None]) -> str:
    """Train the caption tokenizer on the first shards' captions; returns its name in shards/."""
    import tempfile
    from pathlib import Path

    from filip.tokenizer import FilipTokenizer, train_tokenizer

    rel = f"{FOLDER}/{TOKENIZER_NAME}"
    if storage.exists(rel):
        return TOKENIZER_NAME

    def sentences():
        count = 0
        for name in names:
            table = storage.read_parquet(f"{PARQUET_FOLDER}/{name}.parquet")
            for column in CAPTION_COLUMNS:
                if column not in table.column_names:
                    continue
                for text in table[column].to_pylist():
                    if count >= max_sentences:
                        return
                    if text:
                        count += 1
                        yield text

    with tempfile.TemporaryDirectory(prefix="filip-tok-") as local:
        path = train_tokenizer(sentences(), Path(local) / TOKENIZER_NAME, vocab_size)
        vocab = FilipTokenizer.load(path).vocab_size
        storage.write_bytes(rel, path.read_bytes())
    progress(f"[shards] tokenizer {rel}: SentencePiece BPE, vocabulary {vocab}")
    return TOKENIZER_NAME


def _versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def split_evenly(kept: dict[str, int], parts: int) -> list[list[str]]:
    """Consecutive groups of stage shards holding about the same number of kept rows."""
    total, groups, current, seen = sum(kept.values()), [], [], 0
    for shard, count in kept.items():
        current.append(shard)
        seen += count
        if seen * parts >= total * (len(groups) + 1) and len(groups) < parts - 1:
            groups.append(current)
            current = []
    return groups + [current] if current else groups


def plan(kept: dict[str, int], n_final: int, workers: int, rows_per_task: int) -> dict:
    """Map groups and reduce tasks: enough tasks for every worker, none above `rows_per_task` rows."""
    total = sum(kept.values())
    tasks = max(math.ceil(total / rows_per_task), workers)
    n_buckets = min(n_final, tasks)
    return {"n_final": n_final, "groups": split_evenly(kept, min(len(kept), tasks)),
            "bucket_starts": [i * n_final // n_buckets for i in range(n_buckets)]}


def _load_or_plan(storage: Storage, kept: dict[str, int], n_final: int, rows_per_task: int) -> dict:
    """The plan of an interrupted run, whose parts are on disk, or a new one."""
    import ray

    rel = f"{PARTS}/plan.json"
    if storage.exists(rel):
        found = storage.read_json(rel)
        if found["n_final"] == n_final and [s for g in found["groups"] for s in g] == list(kept):
            return found
        storage.remove(PARTS, recursive=True)  # not this run's (cannot happen unless edited by hand)
    workers = int(ray.cluster_resources().get("CPU", 1))
    found = plan(kept, n_final, workers, rows_per_task)
    storage.write_json(rel, found)
    return found


def _run_on_ray(storage: Storage, kept: dict[str, int], last_stage: str, n_final: int, pending: set[int],
                seed: int, encode_format: str, rows_per_task: int) -> dict[str, int]:
    import ray

    layout = _load_or_plan(storage, kept, n_final, rows_per_task)
    starts = layout["bucket_starts"] + [n_final]
    todo = {b: [j for j in range(starts[b], starts[b + 1]) if j in pending] for b in range(len(starts) - 1)}
    todo = {b: finals for b, finals in todo.items() if finals}
    reduce_task = ray.remote(num_cpus=1)(reduce_bucket)
    groups = layout["groups"]
    if len(groups) == 1:  # one map group: each reduce task reads the few stage shards itself
        refs = [reduce_task.remote(storage.url, b, f, n_final, encode_format, (last_stage, groups[0], seed))
                for b, f in todo.items()]
        return {k: v for counts in ray.get(refs) for k, v in counts.items()}
    needed = sorted(todo)
    map_task = ray.remote(num_cpus=1)(map_group)
    maps = []
    for g, sources in enumerate(groups):
        marker = f"{PARTS}/_map-{shard_name(g)}.done"
        if not storage.exists(marker) or not set(needed) <= set(storage.read_json(marker)["buckets"]):
            maps.append(map_task.remote(storage.url, last_stage, g, sources, seed, n_final,
                                        layout["bucket_starts"], needed))
    ray.get(maps)
    refs = [reduce_task.remote(storage.url, b, f, n_final, encode_format) for b, f in todo.items()]
    return {k: v for counts in ray.get(refs) for k, v in counts.items()}


def write_final_shards(storage: Storage, config, last_stage: str, kept: dict[str, int],
                       progress: Callable[[str], None] = print, driver_max_rows: int = DRIVER_MAX_ROWS,
                       rows_per_task: int = ROWS_PER_TASK) -> tuple[dict, StageStats]:
    """Write every final shard not yet done, `sizes.json` and `manifest.json`. `kept`: kept rows per
    shard of the last stage, in shard order (none: a manifest of zero shards). Returns the summary
    ({"shards": N, "samples": n}) and the step's statistics."""
    start = time.perf_counter()
    kept = {s: n for s, n in kept.items() if n}
    total = sum(kept.values())
    n_final = math.ceil(total / config.shards.samples_per_shard)
    names = [shard_name(j) for j in range(n_final)]
    storage.makedirs(FOLDER)
    for folder in (FOLDER, PARQUET_FOLDER):
        storage.clean_temporaries(folder)
    done = set(storage.glob(f"{FOLDER}/_[0-9]*.done"))
    pending = {j for j, name in enumerate(names) if f"{FOLDER}/_{name}.done" not in done}
    seed, encode_format = config.shards.seed, config.download.encode_format
    if not pending:
        written = {}
    elif total <= driver_max_rows:
        written = reduce_bucket(storage.url, 0, sorted(pending), n_final, encode_format,
                                (last_stage, list(kept), seed))
    else:
        written = _run_on_ray(storage, kept, last_stage, n_final, pending, seed, encode_format, rows_per_task)
    storage.remove(PARTS, recursive=True)
    counts = [written[n] if n in written else storage.read_json(done_marker(n))["samples"] for n in names]
    tokenizer = None
    if config.shards.tokenizer_vocab_size and names:
        tokenizer = train_shard_tokenizer(storage, names, config.shards.tokenizer_vocab_size,
                                          config.shards.tokenizer_max_sentences, progress)
    elif config.shards.tokenizer_vocab_size:
        progress("[shards] no tokenizer trained: there is no caption to train it on")
    manifest = {
        # Paths relative to the output folder: tars in shards/, their rows in shards_parquet/.
        "shards": [{"name": f"{n}.tar", "tar": f"{FOLDER}/{n}.tar", "parquet": f"{PARQUET_FOLDER}/{n}.parquet",
                    "samples": c} for n, c in zip(names, counts)],
        "total_samples": int(sum(counts)),
        "samples_per_shard": config.shards.samples_per_shard,
        "seed": seed,
        "config_sha256": hashlib.sha256(storage.read_bytes("config.resolved.yaml")).hexdigest(),
        "libraries": _versions(),
        "tokenizer": tokenizer,
    }
    storage.write_json(f"{FOLDER}/{SIZES_NAME}", {f"{n}.tar": c for n, c in zip(names, counts)})
    storage.write_json(f"{FOLDER}/manifest.json", manifest)
    storage.write_json("manifest.json", manifest)
    stats = StageStats(stage=STEP, rows_in=total, rows_out=manifest["total_samples"], shards=n_final,
                       counters={"final_shards": n_final}, seconds=time.perf_counter() - start)
    progress(f"[shards] {manifest['total_samples']} samples in {n_final} shard(s) "
             f"({len(written)} written now) in {stats.seconds:.1f} s")
    return {"shards": n_final, "samples": manifest["total_samples"]}, stats
