"""The download stage: guarded, bounded fetches written in img2dataset's format.

The files under `<output>/download/` are img2dataset's: `NNNNN.tar` (per sample `<key>.jpg`,
`.json`, `.txt`), `NNNNN.parquet` (one row per input row, its columns plus `key`, `status`,
`error_message`, sizes, `sha256`) and `NNNNN_stats.json` (to which `Stage.finish_shard` adds this
stage's counters: one stats file per shard), with img2dataset's keys. They are written by
`pipeline/img2dataset_format.py`, which a test holds to img2dataset's own writer, as importing
img2dataset costs each worker 3.7-4.1 CPU-seconds (torch, wandb, albumentations). Two more pieces of
img2dataset are replaced, because they cannot be made safe from outside: its fetcher (urllib
follows redirects to any address, has no deadline and reads bodies whole) by
`filters/web/fetch.py`, and its cv2 resizer (decodes before any pixel check, ignores EXIF
orientation, mangles 16-bit images) by `filters/web/image_encode.py`. Its per-shard loop is
replaced with the one below, which also records each row's final URL, redirect count and attempts.

A shard is written into a temporary folder and moved into place, then marked done, so a killed
run never leaves a partial shard that looks complete.
"""
from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pyarrow as pa

from filters.web.address import AddressPolicy
from filters.web.fetch import FetchResult, FetchSettings, fetch_with_retries
from filters.web.image_encode import EncodeSettings, ImageRefused, encode_for_training
from pipeline.img2dataset_format import WebDatasetShardWriter, compute_key, write_stats
from pipeline.download_config import DownloadConfig
from pipeline.registry import IMAGES_FROM, StageSpec, register_stage
from pipeline.schema import DOWNLOAD_COLUMNS
from pipeline.stage import DROP_KIND, DROP_REASON, Stage, kept_rows, stats_from_decisions
from pipeline.stats import StageStats

OOM_SHARD_COUNT = 5  # img2dataset's digits for the shard number in a key
# Columns this stage adds to img2dataset's parquet.
DOWNLOAD_COLUMNS = (("final_url", pa.string()), ("redirects", pa.int32()), ("attempts", pa.int32()))
DROPPED_REASONS = {"robots_optout"}  # our decision to honour the site's wish, not a failure


def classify_outcome(status: str | None, error: str | None) -> tuple[str | None, str | None]:
    """(kind, reason) of one row: (None, None) for a success, else ('failed' or 'dropped', reason).
    The reason is the code before the first ':' of `error_message`."""
    if status == "success":
        return None, None
    reason = (error or "download_error").split(":", 1)[0].strip() or "download_error"
    return ("dropped" if reason in DROPPED_REASONS else "failed"), reason


def fetch_settings(config: DownloadConfig) -> FetchSettings:
    return FetchSettings(
        policy=AddressPolicy.from_strings(config.allow_networks), timeout=config.timeout,
        deadline=config.deadline, max_body_bytes=config.max_body_bytes,
        max_redirects=config.max_redirects,
        user_agent_token=config.user_agent_token.strip().lower() if config.user_agent_token else None,
        disallowed_header_directives=frozenset(d.strip().lower() for d in config.disallowed_header_directives),
        hosts={name.lower(): tuple(addresses) for name, addresses in config.hosts.items()})


def encode_settings(config: DownloadConfig) -> EncodeSettings:
    return EncodeSettings(image_size=config.image_size, resize_mode=config.resize_mode,
                          resize_only_if_bigger=config.resize_only_if_bigger,
                          encode_format=config.encode_format, encode_quality=config.encode_quality,
                          max_pixels=config.max_pixels)


class DownloadStage(Stage):
    """Downloads the kept rows of `input_stage` (the input shards `input/NNNNN.parquet`, or a
    caption-only stage listed before it) into img2dataset's `download/NNNNN.{tar,parquet}`."""

    name = IMAGES_FROM

    def __init__(self, output: str, config: DownloadConfig, shard_size: int, input_stage: str = "input"):
        super().__init__(output, config.resources)
        self.config = config
        self.shard_size = shard_size
        self.input_stage = input_stage

    def _rows_to_fetch(self, shard: str) -> pa.Table:
        rows = self.storage.read_parquet(f"{self.input_stage}/{shard}.parquet")
        if self.input_stage == "input":
            return rows
        rows = kept_rows(rows)  # a stage before download dropped some captions already
        return rows.drop_columns([c for c in (DROP_REASON, DROP_KIND) if c in rows.column_names])

    def run_shard(self, shard: str) -> StageStats:
        start = time.perf_counter()
        storage = self.storage
        rows = self._rows_to_fetch(shard)
        tmp_rel = f"{self.name}/.tmp-{uuid.uuid4().hex[:8]}-{shard}"
        storage.makedirs(tmp_rel)
        try:
            # The parquet comes out sorted by key: every later stage and a resumed run see the
            # same order, whatever order the thread pool finished the rows in.
            written = self._download_into(int(shard), rows, storage.full_url(tmp_rel))
            # img2dataset's stats file last: other tools take it as img2dataset's completion mark.
            for suffix in (".tar", ".parquet", "_stats.json"):
                storage.move(f"{tmp_rel}/{shard}{suffix}", f"{self.name}/{shard}{suffix}")
        finally:
            storage.remove(tmp_rel, recursive=True)
        if written.num_rows != rows.num_rows:
            raise RuntimeError(f"download shard {shard}: {written.num_rows} rows written for {rows.num_rows}")
        stats = stats_from_decisions(self.name, download_decisions(written))
        stats.seconds = time.perf_counter() - start
        return stats

    def _download_into(self, shard_id: int, rows: pa.Table, folder: str) -> pa.Table:
        """Fetch and write the shard's files into `folder`; returns the rows' status columns."""
        cfg = self.config
        started = time.time()
        columns = ["url", "caption"] + [c for c in rows.column_names if c not in ("url", "caption")]
        rows = rows.select(columns)
        schema = rows.schema
        for name, kind in (("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                           ("original_height", pa.int32()), ("sha256", pa.string()), *DOWNLOAD_COLUMNS):
            schema = schema.append(pa.field(name, kind))
        writer = WebDatasetShardWriter(shard_id, folder, schema, cfg.encode_format, OOM_SHARD_COUNT)
        fetching, encoding = fetch_settings(cfg), encode_settings(cfg)
        key_digits = math.ceil(math.log10(self.shard_size))  # img2dataset's digits for the index
        records = rows.to_pylist()
        counts = {"failed_to_download": 0, "failed_to_resize": 0, "success": 0}
        messages: Counter = Counter()

        def fetch_row(index: int) -> tuple[int, FetchResult]:
            return index, fetch_with_retries(records[index]["url"], fetching, cfg.retries, cfg.max_retry_wait)

        # Fetched bodies wait for the encoder (this thread, as in img2dataset); at most
        # thread_count + 8 rows are in flight or waiting, so memory stays under that many bodies.
        with ThreadPoolExecutor(cfg.thread_count, thread_name_prefix="fetch") as pool:
            for index, fetched in _as_completed(pool, fetch_row, len(records), cfg.thread_count + 8):
                meta, image = _row_outcome(fetched, encoding)
                meta = {**records[index], "key": compute_key(index, shard_id, key_digits, OOM_SHARD_COUNT),
                        **meta}
                counts[meta["status"]] += 1
                messages[meta["error_message"] or "success"] += 1
                writer.write(image, meta["key"], meta["caption"], meta)
        written = writer.close()
        write_stats(folder, shard_id, len(records), counts["success"], counts["failed_to_download"],
                    counts["failed_to_resize"], started, time.time(), messages, OOM_SHARD_COUNT)
        return written


def _row_outcome(fetched: FetchResult, encoding: EncodeSettings) -> tuple[dict, bytes | None]:
    """img2dataset's per-row columns (and ours) for one fetch, and the image to store if any."""
    meta = {"status": "failed_to_download", "error_message": fetched.error_message, "width": None,
            "height": None, "original_width": None, "original_height": None, "sha256": None,
            "final_url": fetched.final_url, "redirects": fetched.redirects, "attempts": fetched.attempts}
    if fetched.body is None:
        return meta, None
    try:
        encoded = encode_for_training(fetched.body, encoding)
    except ImageRefused as refused:
        meta.update(status="failed_to_resize", error_message=str(refused))
        return meta, None
    meta.update(status="success", width=encoded.width, height=encoded.height,
                original_width=encoded.original_width, original_height=encoded.original_height,
                sha256=hashlib.sha256(fetched.body).hexdigest())
    return meta, encoded.data


def _as_completed(pool: ThreadPoolExecutor, function, count: int, in_flight: int):
    """`function(i)` for i in range(count) on the pool, yielded as they complete, with at most
    `in_flight` submitted and not yet yielded (the caller consumes before more are submitted)."""
    pending: set = set()
    submitted = 0
    while submitted < count or pending:
        while submitted < count and len(pending) < in_flight:
            pending.add(pool.submit(function, submitted))
            submitted += 1
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()


def download_decisions(table: pa.Table) -> pa.Table:
    """The download parquet with `drop_reason`/`drop_kind` columns (for decisions and the report)."""
    pairs = [classify_outcome(s, e) for s, e in zip(table["status"].to_pylist(),
                                                      table["error_message"].to_pylist())]
    table = table.append_column(DROP_REASON, pa.array([p[1] for p in pairs], pa.string()))
    return table.append_column(DROP_KIND, pa.array([p[0] for p in pairs], pa.string()))



register_stage(StageSpec(
    name=IMAGES_FROM, section="download", config=DownloadConfig,
    build=lambda section, ctx: [DownloadStage(ctx.output, section, ctx.config.run.shard_size, ctx.input_stage)],
    columns=DOWNLOAD_COLUMNS,
    description="fetch every URL through the address guard; resize and encode as img2dataset does"))
