"""`download/` holds one stats file per shard, img2dataset's `NNNNN_stats.json`, with its keys and
the stage's counters; every stage folder uses that name, and stats.json is their sum."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

IMG2DATASET_KEYS = {"count", "successes", "failed_to_download", "failed_to_resize", "duration",
                    "start_time", "end_time", "status_dict"}


def test_one_stats_file_per_download_shard(interop_corpus: Path) -> None:
    summary = json.loads((interop_corpus / "stats.json").read_text())
    shards = summary["shards"]
    download = interop_corpus / "download"
    assert sorted(p.name for p in download.glob("*stats*")) == [f"{s}_stats.json" for s in shards]
    for shard in shards:
        stats = json.loads((download / f"{shard}_stats.json").read_text())
        assert IMG2DATASET_KEYS <= set(stats) and stats["stage"] == "download"
        rows = pq.read_table(download / f"{shard}.parquet", columns=["status"])["status"].to_pylist()
        assert stats["count"] == stats["rows_in"] == len(rows)
        assert stats["successes"] == stats["rows_out"] == rows.count("success")


def test_every_stage_counts_into_nnnnn_stats_json(interop_corpus: Path) -> None:
    summary = json.loads((interop_corpus / "stats.json").read_text())
    stages = [s for s in summary["stages"] if s["stage"] != "input" and not s["skipped"]]
    assert {"download", "inspect", "dedup", "unsafe", "backtranslate"} <= {s["stage"] for s in stages}
    for merged in stages:
        folder = interop_corpus / merged["stage"]
        assert not list(folder.glob("*.stats.json"))
        files = [json.loads((folder / f"{s}_stats.json").read_text()) for s in summary["shards"]]
        assert sum(f["rows_in"] for f in files) == merged["rows_in"]
        assert sum(f["rows_out"] for f in files) == merged["rows_out"]


def test_a_run_folder_of_the_earlier_naming_is_read(interop_corpus: Path, tmp_path: Path) -> None:
    """Resuming a run begun before the rename: counters in `NNNNN.stats.json`, and in download/
    an `NNNNN_stats.json` with img2dataset's keys only."""
    from pipeline.build import shard_stats
    from pipeline.stats import StageStats
    from pipeline.storage import Storage

    shard = json.loads((interop_corpus / "stats.json").read_text())["shards"][0]
    merged = json.loads((interop_corpus / "download" / f"{shard}_stats.json").read_text())
    ours = {k: v for k, v in merged.items() if k not in IMG2DATASET_KEYS}
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / f"{shard}_stats.json").write_text(
        json.dumps({k: merged[k] for k in IMG2DATASET_KEYS}))
    (tmp_path / "download" / f"{shard}.stats.json").write_text(json.dumps(ours))
    storage = Storage(str(tmp_path))
    assert shard_stats(storage, "download", [shard, "99999"]) == {shard: StageStats.from_dict(ours)}
    assert ours["rows_in"] == merged["count"] > 0
