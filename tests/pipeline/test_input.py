import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filters.web.address import AddressPolicy
from pipeline.config import config_from_dict
from pipeline.input import prepare_input
from pipeline.input_read import InputError
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


# --- column shapes and encodings -------------------------------------------------------------

def _kept(storage: Storage, shards: list[str]) -> pa.Table:
    return pa.concat_tables([storage.read_parquet(f"input/{s}.parquet") for s in shards])


def _bad_utf8_strings(values: list[bytes]) -> pa.Array:
    # A string array holding bytes that are not UTF-8, as a careless Parquet writer leaves it.
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])


def _urls(n: int) -> list[str]:
    return [f"http://example.org/{i}.jpg" for i in range(n)]


def test_tsv_has_no_quoting(tmp_path: Path) -> None:
    lines = ["url\tcaption", 'http://example.org/x.jpg\t"unclosed quote at the start']
    lines += [f"{u}\trow {i}" for i, u in enumerate(_urls(999))]
    lines += ['http://example.org/q.jpg\tsay "hi" and ""twice""']
    path = tmp_path / "list.tsv"
    path.write_text("\n".join(lines) + "\n")
    storage, shards, stats = _run(tmp_path, path, shard_size=10_000)
    assert stats.rows_in == 1001 and stats.rows_out == 1001
    captions = _kept(storage, shards)["caption"].to_pylist()
    assert captions[0] == '"unclosed quote at the start'
    assert captions[1:3] == ["row 0", "row 1"]
    assert captions[-1] == 'say "hi" and ""twice""'


def test_csv_keeps_standard_quoting(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text('url,caption\n'
                    'http://example.org/1.jpg,"a, quoted caption"\n'
                    'http://example.org/2.jpg,"two\nlines"\n'
                    'http://example.org/3.jpg,"say ""hi"""\n')
    storage, shards, _ = _run(tmp_path, path, shard_size=10)
    assert _kept(storage, shards)["caption"].to_pylist() == ["a, quoted caption", "two\nlines", 'say "hi"']


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_columns_are_text_and_only_empty_is_null(tmp_path: Path, fmt: str) -> None:
    rows = [{"url": u, "caption": c, "n": n} for u, c, n in
            zip(_urls(4), ["NA", "null", "", "N/A"], ["1", "2", "", "x"])]
    storage, shards, _ = _run(tmp_path, _write(tmp_path, fmt, rows), shard_size=10)
    kept = _kept(storage, shards)
    assert kept["caption"].to_pylist() == ["NA", "null", None, "N/A"]
    assert kept.schema.field("n").type == pa.string()
    assert kept["n"].to_pylist() == ["1", "2", None, "x"]


def test_tsv_row_with_a_stray_tab_is_a_short_error(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv"
    path.write_text("url\tcaption\nhttp://example.org/1.jpg\t" + "x" * 100_000 + "\textra\n")
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read as tsv: CSV parse error: Expected 2 columns, got 3")
    assert len(message) < 400


@pytest.mark.parametrize("column, values, found", [
    ("url", [["http://example.org/1.jpg"]], "list<element: string>"),
    ("url", [{"href": "http://example.org/1.jpg"}], "struct<href: string>"),
    ("caption", [7], "int64"),
    ("caption", [{"text": "a"}], "struct<text: string>"),
])
def test_url_and_caption_must_be_text(tmp_path: Path, column: str, values: list, found: str) -> None:
    data = {"url": ["http://example.org/1.jpg"], "caption": ["one"], column: values}
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table(data), path)
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (
        f"{path}: column '{column}' has type {found}, but the {column} column must hold text "
        f"(strings); if it is the wrong column, set run.{column}_column")


def test_numeric_url_in_json_lines_names_the_users_column(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"link": 12, "caption": "a"}\n')
    with pytest.raises(InputError, match=r"column 'link' has type int64, but the url column must hold"):
        _run(tmp_path, path, url_column="link")


def test_text_like_types_are_accepted(tmp_path: Path) -> None:
    table = pa.table({
        "url": pa.array(_urls(3), pa.large_string()),
        "caption": pa.array(["a", "b", "a"]).dictionary_encode(),
        "lang": pa.array(["en", "de", "en"]).dictionary_encode(),
        "tags": pa.array([["x"], [], None], pa.list_(pa.string())),
    })
    path = tmp_path / "list.parquet"
    pq.write_table(table, path)
    storage, shards, stats = _run(tmp_path, path, shard_size=10)
    kept = _kept(storage, shards)
    assert stats.rows_out == 3
    assert kept.schema.field("url").type == pa.string() and kept.schema.field("caption").type == pa.string()
    assert kept.schema.field("lang").type == pa.string()  # dictionary decoded
    assert kept["tags"].to_pylist() == [["x"], [], None]  # nested extra carried as it is


def test_binary_is_decoded_when_utf8(tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": pa.array([u.encode() for u in _urls(2)], pa.binary()),
                             "caption": pa.array(["größe".encode(), b"b"], pa.binary())}), path)
    storage, shards, _ = _run(tmp_path, path, shard_size=10)
    assert _kept(storage, shards)["caption"].to_pylist() == ["größe", "b"]


def test_null_type_columns_are_empty(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"url": null, "caption": null}\n' * 2)
    _, shards, stats = _run(tmp_path, path)
    assert (stats.rows_in, stats.rows_out, dict(stats.dropped), shards) == (2, 0, {"empty_url": 2}, [])


def test_binary_with_bad_utf8_names_column_and_row(tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": _urls(3), "caption": pa.array([b"a", b"b", b"\xff"], pa.binary())}),
                   path)
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (
        f"{path}: column 'caption' is not valid UTF-8 text"
        " (row 2 of the file, counting from 0)")


@pytest.mark.parametrize("column", ["url", "lang"])
def test_string_column_with_bad_utf8_names_column_and_row(tmp_path: Path, column: str) -> None:
    data = {"url": pa.array(_urls(2)), "caption": pa.array(["a", "b"]), "lang": pa.array(["en", "de"])}
    data[column] = _bad_utf8_strings([b"ok", b"bad\xc3("])
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table(data), path)
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (
        f"{path}: column '{column}' is not valid UTF-8 text"
        " (row 1 of the file, counting from 0)")


def test_bad_utf8_in_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'{"url": "http://example.org/1.jpg", "caption": "a"}\n'
                     b'{"url": "http://example.org/2.jpg", "caption": "b\xff"}\n')
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (
        f"{path}: column 'caption' is not valid UTF-8 text"
        " (row 1 of the file, counting from 0)")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_bad_utf8_in_delimited_text(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"list.{fmt}"
    sep = b"," if fmt == "csv" else b"\t"
    path.write_bytes(b"url" + sep + b"caption\nhttp://example.org/1.jpg" + sep + b"caf\xe9\n")
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (
        f"{path}: column 'caption' is not valid UTF-8 text"
        " (at or after row 0, counting from 0)")


def _folder(tmp_path: Path, *extras: dict) -> Path:
    folder = tmp_path / "lists"
    folder.mkdir()
    for i, extra in enumerate(extras):
        n = len(next(iter(extra.values())))
        pq.write_table(pa.table({"url": _urls(100)[5 * i:5 * i + n], "caption": [f"c{i}"] * n, **extra}),
                       folder / f"part-{i}.parquet")
    return folder


def test_files_that_disagree_on_a_plain_column_get_strings(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"lang": pa.array(["en"]), "n": pa.array([1], pa.int32())},
                     {"lang": pa.array([7], pa.int64()), "n": pa.array([2], pa.int64())},
                     {"lang": pa.array([True])})
    storage, shards, stats = _run(tmp_path, folder, shard_size=2)
    kept = _kept(storage, shards)
    assert stats.rows_out == 3
    assert kept.schema.field("lang").type == pa.string()
    assert kept["lang"].to_pylist() == ["en", "7", "true"]
    assert kept.schema.field("n").type == pa.int64()  # widened, not made text
    assert kept["n"].to_pylist() == [1, 2, None]


def test_files_that_disagree_beyond_conversion_name_both(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"tags": pa.array(["a"])}, {"tags": pa.array([["a", "b"]])})
    with pytest.raises(InputError) as caught:
        _run(tmp_path, folder)
    assert str(caught.value) == (
        f"{folder}/part-1.parquet: column 'tags' has type list<element: string>, but "
        f"{folder}/part-0.parquet has it as string; the files of one input must agree on a column's type")


def test_reserved_name_colliding_with_its_carried_name(tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": _urls(1), "caption": ["a"], "key": ["k"], "source_key": ["s"]}), path)
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (
        f"{path}: columns 'key' and 'source_key' would both be stored as 'source_key' ('key' is a "
        "name the pipeline writes itself, so the input's is kept as 'source_<name>'); rename one of them")


def test_repeated_column_name(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text("url,caption,lang,lang\nhttp://example.org/1.jpg,a,en,de\n")
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == f"{path}: column 'lang' appears 2 times; column names must be unique"


def test_url_and_caption_column_must_differ(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run.url_column and run.caption_column both name 'url'"):
        _run(tmp_path, _write(tmp_path, "csv"), caption_column="url")


def test_json_lines_column_changing_type_names_it(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"url": "http://example.org/1.jpg", "caption": "a"}\n{"url": 2, "caption": "b"}\n')
    with pytest.raises(InputError) as caught:
        _run(tmp_path, path)
    assert str(caught.value) == (f"{path}: cannot read as jsonl: JSON parse error: Column(/url) changed "
                                 "from string to number in row 1")
