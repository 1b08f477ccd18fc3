import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filters.web.address import AddressPolicy
from pipeline.config import config_from_dict
from pipeline.input import InputError, prepare_input
from pipeline.storage import Storage

ROWS = [
    {"url": "http://example.org/1.jpg", "caption": "one", "lang": "en"},
    {"url": "http://example.org/2.jpg", "caption": "two", "lang": "en"},
    {"url": "http://example.org/1.jpg", "caption": "one", "lang": "en"},   # exact repeat of row 0
    {"url": "http://example.org/1.jpg", "caption": "uno", "lang": "es"},   # same url, other caption
    {"url": "ftp://example.org/3.jpg", "caption": "three", "lang": "en"},
    {"url": "", "caption": "empty", "lang": "en"},
    {"url": "not a url", "caption": "bad", "lang": "en"},
    {"url": "http://10.0.0.5/x.jpg", "caption": "internal", "lang": "en"},
    {"url": "http://example.org/4.jpg", "caption": "four", "lang": "en"},
]


def _write(tmp_path: Path, fmt: str, rows=ROWS, url="url", caption="caption") -> Path:
    renamed = [{(url if k == "url" else caption if k == "caption" else k): v for k, v in r.items()}
               for r in rows]
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(renamed), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    else:
        sep = "," if fmt == "csv" else "\t"
        keys = list(renamed[0])
        lines = [sep.join(keys)] + [sep.join(str(r[k]) for k in keys) for r in renamed]
        path.write_text("\n".join(lines) + "\n")
    return path


def _run(tmp_path: Path, input_path: Path, policy: AddressPolicy | None = None, **run):
    config = config_from_dict({"run": {"input": str(input_path), "output": str(tmp_path / "out"),
                                       "shard_size": 2, **run}})
    storage = Storage(config.run.output)
    shards, stats = prepare_input(config.run, storage, policy)
    return storage, shards, stats


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_formats_reasons_and_dedup(tmp_path: Path, fmt: str) -> None:
    storage, shards, stats = _run(tmp_path, _write(tmp_path, fmt))
    assert stats.rows_in == 9
    assert dict(stats.dropped) == {"duplicate_row": 1, "unsupported_scheme": 1, "empty_url": 1,
                                   "malformed_url": 1, "blocked_address": 1}
    assert stats.rows_out == 4
    stats.check_conservation()
    assert shards == ["00000", "00001"]  # 4 rows, 2 per shard
    kept = pa.concat_tables([storage.read_parquet(f"input/{s}.parquet") for s in shards])
    assert kept["row_id"].to_pylist() == [0, 1, 3, 8]
    assert kept["lang"].to_pylist() == ["en", "en", "es", "en"]  # extra columns carried
    rejected = storage.read_parquet("input/rejected/00000.parquet").to_pylist()
    by_row = {r["row_id"]: r for r in rejected}
    assert by_row[2]["drop_reason"] == "duplicate_row" and by_row[2]["duplicate_of_row"] == 0
    assert by_row[7]["drop_reason"] == "blocked_address"
    assert sorted(by_row) == [2, 4, 5, 6, 7]


def test_custom_column_names_and_reserved_extra(tmp_path: Path) -> None:
    rows = [{"url": r["url"], "caption": r["caption"], "status": "x"} for r in ROWS]
    path = _write(tmp_path, "parquet", rows, url="URL", caption="TEXT")
    storage, shards, _ = _run(tmp_path, path, url_column="URL", caption_column="TEXT")
    table = storage.read_parquet(f"input/{shards[0]}.parquet")
    assert {"url", "caption", "source_status"} <= set(table.column_names)


def test_allowed_network_passes_the_early_check(tmp_path: Path) -> None:
    _, _, stats = _run(tmp_path, _write(tmp_path, "csv"), AddressPolicy.from_strings(["10.0.0.0/8"]))
    assert "blocked_address" not in stats.dropped


def test_missing_file_and_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input URL list not found"):
        _run(tmp_path, tmp_path / "absent.parquet")
    path = _write(tmp_path, "csv")
    with pytest.raises(InputError, match=r"list\.csv: missing column\(s\) \['link'\]"):
        _run(tmp_path, path, url_column="link")


def test_unknown_extension_needs_format(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("url,caption\nhttp://example.org/a.jpg,a\n")
    with pytest.raises(InputError, match="set run.input_format"):
        _run(tmp_path, path)
    _, _, stats = _run(tmp_path, path, input_format="csv")
    assert stats.rows_out == 1
