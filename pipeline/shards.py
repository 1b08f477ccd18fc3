"""The final training shards: re-sharded, deterministically shuffled WebDataset tars + Parquet.

The order of samples is a global sort by a seeded hash of the key (Ray Data's distributed sort),
which is a deterministic shuffle: a resumed run cuts exactly the same shards. The driver streams
the sorted metadata in batches of `samples_per_shard` rows and a Ray task writes each shard,
reading image bytes from the download tars by their recorded offsets.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from importlib import metadata
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stage import DROP_KIND, DROP_REASON, shard_name
from pipeline.storage import Storage

FOLDER = "shards"
INTERNAL_COLUMNS = {DROP_REASON, DROP_KIND, "tar_offset", "tar_size", "shuffle_key", "image", "status",
                    "error_message"}
LIBRARIES = ("img2dataset", "ray", "pyarrow", "imagehash", "nudenet", "onnxruntime", "transformers",
             "sentencepiece", "torch", "webdataset")
# filip.tokenizer.DEFAULT_NAME, where the trainer looks beside the shards (not imported here:
# that module imports torch, and every shard-writing Ray worker imports this one).
TOKENIZER_NAME = "tokenizer.model"
CAPTION_COLUMNS = ("caption", "caption_bt_de", "caption_bt_ru")


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
            table = storage.read_parquet(f"{FOLDER}/{name}.parquet")
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


def shuffle_keys(keys: list[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash per key: sorting by it shuffles, the same way on every run."""
    out = np.empty(len(keys), np.uint64)
    prefix = f"{seed}:".encode()
    for i, key in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + key.encode(), digest_size=8).digest(), "little")
    return out


def _sample_json(row: dict) -> bytes:
    meta = {k: v for k, v in row.items() if k not in INTERNAL_COLUMNS}
    return json.dumps(meta, ensure_ascii=False, default=str).encode()


def write_shard(output: str, name: str, rows: pa.Table, encode_format: str = "jpg") -> int:
    """Write `shards/<name>.tar` and `.parquet` for `rows` (in order), then the marker."""
    storage = Storage(output)
    records = rows.to_pylist()
    images: dict[str, bytes] = {}
    by_source: dict[str, list[dict]] = {}
    for row in records:
        by_source.setdefault(row["key"][:5], []).append(row)
    for source, items in by_source.items():  # one open per source tar, reads in file order
        with storage.fs.open(storage.path(f"download/{source}.tar"), "rb") as handle:
            for row in sorted(items, key=lambda r: r["tar_offset"]):
                handle.seek(row["tar_offset"])
                images[row["key"]] = handle.read(row["tar_size"])
    with storage.atomic_open(f"{FOLDER}/{name}.tar", "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for row in records:
                for ext, data in ((encode_format, images[row["key"]]),
                                  ("txt", (row["caption"] or "").encode()), ("json", _sample_json(row))):
                    info = tarfile.TarInfo(f"{row['key']}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    archive.addfile(info, io.BytesIO(data))
    keep = [c for c in rows.column_names if c not in INTERNAL_COLUMNS]
    storage.write_parquet(f"{FOLDER}/{name}.parquet", rows.select(keep))
    storage.write_json(f"{FOLDER}/{name}.done", {"samples": len(records)})
    return len(records)


def _versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_final_shards(storage: Storage, config, last_stage: str, shards: list[str],
                       progress: Callable[[str], None] = print) -> dict:
    """Write every final shard not yet done, then `manifest.json`; returns the manifest.
    `shards`: the last stage's shards that hold kept rows (none: a manifest of zero shards)."""
    start = time.perf_counter()
    per_shard = config.shards.samples_per_shard
    seed = config.shards.seed
    names, counts, pending = [], [], []
    if shards:
        import ray
        import ray.data

        paths = [storage.full_url(f"{last_stage}/{s}.parquet") for s in shards]
        rows = ray.data.read_parquet(paths)

        def keep_and_key(batch: pa.Table) -> pa.Table:
            batch = batch.filter(pc.is_null(batch[DROP_REASON]))
            return batch.append_column("shuffle_key", pa.array(shuffle_keys(batch["key"].to_pylist(), seed)))

        ordered = rows.map_batches(keep_and_key, batch_format="pyarrow").sort("shuffle_key")
        remote_write = ray.remote(num_cpus=1)(write_shard)
        for index, batch in enumerate(ordered.iter_batches(batch_size=per_shard, batch_format="pyarrow")):
            name = shard_name(index)
            names.append(name)
            counts.append(batch.num_rows)
            if not storage.exists(f"{FOLDER}/{name}.done"):
                pending.append(remote_write.remote(storage.url, name, batch, config.download.encode_format))
        ray.get(pending)
    tokenizer = None
    if config.shards.tokenizer_vocab_size and names:
        tokenizer = train_shard_tokenizer(storage, names, config.shards.tokenizer_vocab_size,
                                          config.shards.tokenizer_max_sentences, progress)
    elif config.shards.tokenizer_vocab_size:
        progress("[shards] no tokenizer trained: there is no caption to train it on")
    config_text = storage.read_bytes("config.resolved.yaml")
    manifest = {
        "shards": [{"name": f"{n}.tar", "parquet": f"{n}.parquet", "samples": c} for n, c in zip(names, counts)],
        "total_samples": int(sum(counts)),
        "samples_per_shard": per_shard,
        "seed": seed,
        "config_sha256": hashlib.sha256(config_text).hexdigest(),
        "libraries": _versions(),
        "tokenizer": tokenizer,
    }
    storage.write_json(f"{FOLDER}/manifest.json", manifest)
    storage.write_json("manifest.json", manifest)
    progress(f"[shards] {manifest['total_samples']} samples in {len(names)} shard(s) "
             f"({len(pending)} written now) in {time.perf_counter() - start:.1f} s")
    return {"shards": len(names), "samples": manifest["total_samples"]}
