"""The download stage: img2dataset's own downloader, one shard per Ray actor call.

img2dataset is used as a library (its `Downloader`, `Resizer` and WebDataset writer), so the files
under `<output>/download/` are exactly img2dataset's: `NNNNN.tar`, `NNNNN.parquet` and
`NNNNN_stats.json`. What this stage adds around it: the shard is written into a temporary folder
and moved into place, then marked done, so a killed run never leaves a partial shard that looks
complete; every row's outcome is classified into a reason; truncated files are refused.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
import uuid

import pyarrow as pa

from filters.integrity import truncation_reason
from pipeline.config import DownloadConfig
from pipeline.stage import DROP_KIND, DROP_REASON, Stage, stats_from_decisions
from pipeline.stats import StageStats

ROBOTS_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")


def classify_outcome(status: str | None, error: str | None) -> tuple[str | None, str | None]:
    """(kind, reason) of one img2dataset row: (None, None) for a success, else ('failed' or
    'dropped', reason). An X-Robots-Tag opt-out is our decision to honour it, hence 'dropped'."""
    if status == "success":
        return None, None
    error = error or ""
    if status == "failed_to_resize":
        if error.startswith("truncated"):
            return "failed", "truncated_image"
        if "decoding" in error.lower():
            return "failed", "not_an_image"
        return "failed", "resize_error"
    if error.startswith(ROBOTS_MESSAGE):
        return "dropped", "robots_optout"
    lowered = error.lower()
    if "infinite loop" in lowered:  # urllib reports it as the last redirect's HTTP error
        return "failed", "redirect_loop"
    if match := _HTTP_ERROR.search(error):
        return "failed", f"http_{match.group(1)}"

    if "timed out" in lowered or "timeout" in lowered:
        return "failed", "timeout"
    if "connection refused" in lowered:
        return "failed", "connection_refused"
    if "urlopen error" in lowered or "connection" in lowered or "remote end closed" in lowered:
        return "failed", "connection_error"
    return "failed", "download_error"


def _checking_resizer_class():
    from img2dataset.resizer import Resizer

    class TruncationCheckingResizer(Resizer):
        """img2dataset's Resizer that first refuses files cut before their end marker."""

        def __call__(self, img_stream, blurring_bbox_list=None):
            img_stream.seek(0)
            if truncation_reason(img_stream.read()) is not None:
                return None, None, None, None, None, "truncated image (no end marker)"
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return TruncationCheckingResizer


class DownloadStage(Stage):
    """Downloads `input/NNNNN.parquet` into img2dataset's `download/NNNNN.{tar,parquet}`."""

    name = "download"

    def __init__(self, output: str, config: DownloadConfig, shard_size: int):
        super().__init__(output, config.resources)
        self.config = config
        self.shard_size = shard_size
        self._downloader_parts = None

    def _make_downloader(self, output_folder: str, column_list: list[str]):
        from img2dataset.downloader import Downloader
        from img2dataset.writer import WebDatasetSampleWriter

        cfg = self.config
        resizer = _checking_resizer_class()(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode,
            resize_only_if_bigger=cfg.resize_only_if_bigger, encode_quality=cfg.encode_quality,
            encode_format=cfg.encode_format)
        return Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.thread_count,
            save_caption=True, extract_exif=False, output_folder=output_folder, column_list=column_list,
            timeout=cfg.timeout, number_sample_per_shard=self.shard_size, oom_shard_count=5,
            compute_hash="sha256", verify_hash_type=None, encode_format=cfg.encode_format,
            retries=cfg.retries, user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=cfg.disallowed_header_directives or None)

    def run_shard(self, shard: str) -> StageStats:
        start = time.perf_counter()
        storage = self.storage
        rows = storage.read_parquet(f"input/{shard}.parquet")
        columns = ["url", "caption"] + [c for c in rows.column_names if c not in ("url", "caption")]
        tmp_rel = f"{self.name}/.tmp-{uuid.uuid4().hex[:8]}-{shard}"
        storage.makedirs(tmp_rel)
        try:
            with tempfile.TemporaryDirectory(prefix="filip-dl-") as local:
                feather = os.path.join(local, f"{shard}.feather")
                ordered = rows.select(columns)
                with pa.OSFile(feather, "wb") as sink:
                    with pa.ipc.new_file(sink, ordered.schema) as writer:
                        writer.write_table(ordered)
                downloader = self._make_downloader(storage.full_url(tmp_rel), columns)
                downloader.download_shard((int(shard), feather))
            # img2dataset writes rows in completion order (a thread pool); sorted by key, every
            # later stage and a resumed run see the same order.
            table = storage.read_parquet(f"{tmp_rel}/{shard}.parquet").sort_by("key")
            storage.write_parquet(f"{tmp_rel}/{shard}.parquet", table)
            # img2dataset's stats file last: other tools take it as img2dataset's completion mark.
            for suffix in (".tar", ".parquet", "_stats.json"):
                storage.move(f"{tmp_rel}/{shard}{suffix}", f"{self.name}/{shard}{suffix}")
        finally:
            storage.remove(tmp_rel, recursive=True)
        stats = stats_from_decisions(self.name, download_decisions(table))
        if table.num_rows != rows.num_rows:  # img2dataset writes one parquet row per input row
            raise RuntimeError(f"download shard {shard}: {table.num_rows} rows written for {rows.num_rows}")
        stats.seconds = time.perf_counter() - start
        return stats


def download_decisions(table: pa.Table) -> pa.Table:
    """img2dataset's parquet with `drop_reason`/`drop_kind` columns (for decisions and the report)."""
    pairs = [classify_outcome(s, e) for s, e in zip(table["status"].to_pylist(),
                                                      table["error_message"].to_pylist())]
    table = table.append_column(DROP_REASON, pa.array([p[1] for p in pairs], pa.string()))
    return table.append_column(DROP_KIND, pa.array([p[0] for p in pairs], pa.string()))
