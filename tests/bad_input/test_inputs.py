"""Bad URL lists through the real `filip build`: exit 2, one `error:` line naming the file and the
column, no traceback, and no download shard written (the input stage fails before Ray starts)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.bad_input.cli import assert_user_error, run_filip

URL = "http://127.0.0.1:9/a.jpg"


def _parquet(name: str, **columns: pa.Array) -> Callable[[Path], tuple[Path, list[str]]]:
    def write(folder: Path) -> tuple[Path, list[str]]:
        path = folder / name
        pq.write_table(pa.table(columns), path)
        return path, [str(path)]
    return write


def _text(name: str, data: bytes) -> Callable[[Path], tuple[Path, list[str]]]:
    def write(folder: Path) -> tuple[Path, list[str]]:
        path = folder / name
        path.write_bytes(data)
        return path, [str(path)]
    return write


def _disagreeing_folder(folder: Path) -> tuple[Path, list[str]]:
    lists = folder / "lists"
    lists.mkdir()
    pq.write_table(pa.table({"url": [URL], "caption": ["a"], "lang": ["en"]}), lists / "part-0.parquet")
    pq.write_table(pa.table({"url": [URL], "caption": ["b"], "lang": [["en", "de"]]}),
                   lists / "part-1.parquet")
    return lists, [str(lists / "part-0.parquet"), str(lists / "part-1.parquet")]


# (case, writes the bad input and says which files it must name, what else the message must say)
CASES: list[tuple[str, Callable[[Path], tuple[Path, list[str]]], list[str]]] = [
    ("url_of_lists", _parquet("list.parquet", url=pa.array([[URL]]), caption=pa.array(["a"])),
     ["column 'url'", "list<element: string>"]),
    ("caption_of_structs", _parquet("list.parquet", url=pa.array([URL]), caption=pa.array([{"t": "a"}])),
     ["column 'caption'", "struct<t: string>"]),
    ("binary_url_bad_utf8", _parquet("list.parquet", url=pa.array([b"http://x/\xff"], pa.binary()),
                                     caption=pa.array(["a"])),
     ["column 'url'", "not valid UTF-8", "row 0"]),
    ("numeric_url_jsonl", _text("list.jsonl", b'{"url": 1, "caption": "a"}\n'),
     ["column 'url'", "int64"]),
    ("csv_caption_bad_utf8", _text("list.csv", b"url,caption\n" + URL.encode() + b",caf\xe9\n"),
     ["column 'caption'", "not valid UTF-8"]),
    ("tsv_stray_tab", _text("list.tsv", b"url\tcaption\n" + URL.encode() + b"\t" + b"x" * 50_000 + b"\ty\n"),
     ["cannot read as tsv", "Expected 2 columns, got 3"]),
    ("key_and_source_key", _parquet("list.parquet", url=pa.array([URL]), caption=pa.array(["a"]),
                                    key=pa.array(["k"]), source_key=pa.array(["s"])),
     ["'key'", "'source_key'"]),
    ("files_disagree_on_a_column", _disagreeing_folder, ["column 'lang'"]),
]


@pytest.mark.parametrize("case, write, must_say", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(tmp_path: Path, case: str,
                                     write: Callable[[Path], tuple[Path, list[str]]],
                                     must_say: list[str]) -> None:
    config = tmp_path / "config.yaml"
    # Back-translation off: its model check runs before the input stage and would fail first.
    config.write_text('run: {input: x, output: y}\ndownload: {allow_networks: ["127.0.0.1/32"]}\n'
                      "backtranslation: {enabled: false}\n")
    bad, files = write(tmp_path)
    out = tmp_path / "out"
    result = run_filip("build", config, "--input", bad, "--output", out, timeout=120)
    assert_user_error(result, *files, *must_say)
    assert not list(out.glob("input/*.parquet")) and not (out / "input" / ".done").exists()
