"""Reading a URL list for the input stage: files, formats, and the columns' types.

What the input may hold: the url and caption columns must be text. Accepted as they are or converted
losslessly: string, large_string, string_view, a dictionary of those, binary that is valid UTF-8, and
the null type (all empty). Anything else (numbers, lists, structs, bad UTF-8) is an InputError naming
the file, the column and what was found: a numeric caption column is far more likely the wrong
column than real captions. Other columns are carried as they are (nested types included, dictionaries
decoded), and every shard gets all of them (null where a file lacks one); where the
files of one input give a column different types, it gets the common type Arrow can widen both to
(int32 and int64 give int64, null and string give string), plain values of unlike kinds (string and
int64) become strings, and anything else is an InputError naming both files. CSV and TSV are read
all as text, so nothing is guessed from the first block; only the empty field is null. TSV has no
quoting: tabs separate, a newline ends the row, quotes are ordinary characters.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.errors import UserError


class InputError(UserError, ValueError):
    """The URL list cannot be used: the message names the file and what is wrong."""


def resolve_input_files(spec: str) -> list[str]:
    """A file, a folder (its files, sorted) or a glob."""
    fs, path = fsspec.core.url_to_fs(spec)
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not Path(p).name.startswith((".", "_")))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"{spec}: input URL list not found")
    if not files:
        raise InputError(f"{spec}: no input files found")
    return [fs.unstrip_protocol(f) if fs.protocol not in ("file", ("file", "local")) else f for f in files]


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".json", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return fmt
    raise InputError(f"{path}: cannot tell the format from the name; set run.input_format")


def _short(err: BaseException) -> str:
    # Arrow quotes the offending row, which may be a megabyte of caption.
    text = str(err).strip()
    return text if len(text) <= 300 else text[:300] + " ..."


def _delimited_options(fmt: str) -> pacsv.ParseOptions:
    if fmt == "tsv":
        # TSV has no quoting: a caption that starts with an unclosed `"` must not swallow the rows
        # after it, and quotes inside a caption are part of it.
        return pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                  newlines_in_values=False)
    return pacsv.ParseOptions(delimiter=",", newlines_in_values=True)


def _read_delimited(fs: fsspec.AbstractFileSystem, fpath: str, path: str,
                    fmt: str) -> Iterator[pa.RecordBatch]:
    parse = _delimited_options(fmt)
    read = pacsv.ReadOptions(block_size=1 << 24)
    # Every column is read as text: a type guessed from the first block can fail on a later one and
    # differ between files. So the names come first, from a reader that is then dropped.
    with fs.open(fpath, "rb", compression="infer") as handle:
        names = pacsv.open_csv(handle, parse_options=parse, read_options=read).schema.names
    # Only the empty field is null: a caption "NA" or "null" is text.
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names},
                                   strings_can_be_null=True, null_values=[""])
    rows = 0
    with fs.open(fpath, "rb", compression="infer") as handle:
        try:
            # open_csv converts the first block already, so it can fail too.
            reader = pacsv.open_csv(handle, parse_options=parse, read_options=read,
                                    convert_options=convert)
            for batch in reader:
                rows += batch.num_rows
                yield batch
        except pa.ArrowInvalid as err:
            found = re.search(r"CSV column #(\d+)", str(err))
            if found and "UTF8" in str(err) and int(found.group(1)) < len(names):
                raise InputError(f"{path}: column '{names[int(found.group(1))]}' is not valid UTF-8 "
                                 f"text (at or after row {rows}, counting from 0)") from None
            raise


def _read_batches(path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    fs, fpath = fsspec.core.url_to_fs(path)
    try:
        if fmt == "parquet":
            with fs.open(fpath, "rb") as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65536)
        elif fmt in ("csv", "tsv"):
            yield from _read_delimited(fs, fpath, path, fmt)
        else:
            with fs.open(fpath, "rb", compression="infer") as handle:
                table = pajson.read_json(handle)
            yield from table.to_batches(max_chunksize=65536)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: cannot read as {fmt}: {_short(err)}") from None


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_BYTES_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)


def _bad_utf8_row(column: pa.ChunkedArray) -> int | None:
    # Only on the error path: Arrow says a column is bad, not where.
    try:
        values = column.cast(pa.large_binary()).to_pylist()
    except pa.ArrowException:
        return None
    for i, value in enumerate(values):
        try:
            value is None or value.decode("utf-8")
        except UnicodeDecodeError:
            return i
    return None


def _not_utf8(path: str, name: str, column: pa.ChunkedArray, first_row: int) -> InputError:
    row = _bad_utf8_row(column)
    where = "" if row is None else f" (row {first_row + row} of the file, counting from 0)"
    return InputError(f"{path}: column '{name}' is not valid UTF-8 text{where}")


def _checked_text(path: str, name: str, column: pa.ChunkedArray, first_row: int) -> None:
    # Parquet and JSON readers pass bytes through to string columns without checking them.
    if any(is_text(column.type) for is_text in _TEXT_TYPES):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            raise _not_utf8(path, name, column, first_row) from None


def _as_text(path: str, name: str, role: str, column: pa.ChunkedArray,
             first_row: int) -> pa.ChunkedArray:
    """The url or caption column as pa.string(), or an InputError saying what was found."""
    kind = column.type
    if pa.types.is_dictionary(kind) and any(t(kind.value_type) for t in _TEXT_TYPES + _BYTES_TYPES):
        column, kind = column.cast(kind.value_type), kind.value_type
    if any(t(kind) for t in _BYTES_TYPES):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            raise _not_utf8(path, name, column, first_row) from None
    if pa.types.is_null(kind) or any(t(kind) for t in _TEXT_TYPES):
        _checked_text(path, name, column, first_row)
        return column if kind == pa.string() else column.cast(pa.string())
    found = str(kind) if len(str(kind)) <= 200 else str(kind)[:200] + " ..."
    raise InputError(f"{path}: column '{name}' has type {found}, but the {role} column must hold "
                     f"text (strings); if it is the wrong column, set run.{role}_column")


def _carried_names(path: str, names: list[str], url_column: str, caption_column: str) -> list[str]:
    from pipeline.schema import reserved_columns

    # Columns the pipeline writes itself (its base columns and every registered stage's): an input
    # column with one of these names is carried as `source_<name>`, never overwritten.
    reserved = reserved_columns()
    out = []
    for name in names:
        if name == url_column:
            out.append("url")
        elif name == caption_column:
            out.append("caption")
        else:
            out.append(f"source_{name}" if name in reserved else name)
    for carried in dict.fromkeys(out):
        sources = [n for n, c in zip(names, out) if c == carried]
        if len(sources) == 1:
            continue
        if len(set(sources)) == 1:
            raise InputError(f"{path}: column '{sources[0]}' appears {len(sources)} times; column "
                             "names must be unique")
        clashing = [n for n in sources if n in reserved]
        raise InputError(
            f"{path}: columns {' and '.join(repr(n) for n in dict.fromkeys(sources))} would both be "
            f"stored as '{carried}' ({', '.join(repr(n) for n in clashing)} is a name the pipeline "
            f"writes itself, so the input's is kept as 'source_<name>'); rename one of them")
    return out


def iter_input(config: RunConfig) -> Iterator[tuple[str, pa.Table]]:
    """(file, batch) with `url` and `caption` columns as strings, dictionary columns decoded and
    extra columns renamed if reserved."""
    if config.url_column == config.caption_column:
        raise InputError(f"run.url_column and run.caption_column both name '{config.url_column}'; "
                         "they must be two different columns")
    for path in resolve_input_files(config.input):
        fmt = detect_format(path, config.input_format)
        first_row = 0
        for batch in _read_batches(path, fmt):
            table = pa.Table.from_batches([batch])
            missing = [c for c in (config.url_column, config.caption_column) if c not in table.column_names]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {missing} (found: {table.column_names}); set "
                    f"run.url_column / run.caption_column")
            users = dict(zip(_carried_names(path, table.column_names, config.url_column,
                                            config.caption_column), table.column_names))
            table = table.rename_columns(list(users))
            for i, (name, user_name) in enumerate(users.items()):
                column = table.column(i)
                if name in ("url", "caption"):
                    column = _as_text(path, user_name, name, column, first_row)
                elif pa.types.is_dictionary(column.type):
                    # The encoding is a storage detail; decoded, files that differ in it agree.
                    column = column.cast(column.type.value_type)
                else:
                    _checked_text(path, user_name, column, first_row)
                    continue
                table = table.set_column(i, name, column)
            first_row += table.num_rows
            yield path, table


_PLAIN_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal,
                pa.types.is_temporal, pa.types.is_string, pa.types.is_large_string)


def _castable(types: tuple[pa.DataType, ...], target: pa.DataType) -> bool:
    try:
        for kind in types:
            pa.array([], kind).cast(target)  # Arrow has the cast at all; values are checked in pass 2
        return True
    except pa.ArrowException:
        return False


def _common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    try:
        merged = pa.unify_schemas([pa.schema([("c", a)]), pa.schema([("c", b)])],
                                  promote_options="permissive").field("c").type
    except pa.ArrowException:
        merged = None
    if merged is not None and _castable((a, b), merged):
        return merged
    if all(any(is_plain(t) for is_plain in _PLAIN_TYPES) for t in (a, b)):
        # Every plain value has a text form: int64 in one file and string in another both fit.
        text = pa.large_string() if pa.large_string() in (a, b) else pa.string()
        return text if _castable((a, b), text) else None
    return None


class ColumnTypes:
    """The columns of all input files and the one type of each: learnt in pass 1, applied in
    pass 2, so every shard has the same schema whichever files its rows came from."""

    def __init__(self) -> None:
        # name -> (type, a file that has it), in the order the names first appear
        self.types: dict[str, tuple[pa.DataType, str]] = {}

    def learn(self, path: str, table: pa.Table) -> None:
        for field in table.schema:
            seen = self.types.get(field.name)
            if field.name in ("url", "caption"):  # already strings
                self.types.setdefault(field.name, (field.type, path))
                continue
            if seen is None or seen[0] == field.type:
                self.types.setdefault(field.name, (field.type, path))
                continue
            common = _common_type(seen[0], field.type)
            if common is None:
                raise InputError(
                    f"{path}: column '{field.name}' has type {field.type}, but {seen[1]} has it as "
                    f"{seen[0]}; the files of one input must agree on a column's type")
            self.types[field.name] = (common, path if common == field.type else seen[1])

    def apply(self, path: str, table: pa.Table) -> pa.Table:
        columns = {}
        for name, (target, _) in self.types.items():
            if name not in table.column_names:
                columns[name] = pa.nulls(table.num_rows, target)
                continue
            column = table[name]
            try:
                columns[name] = column if column.type == target else column.cast(target)
            except pa.ArrowException as err:
                raise InputError(f"{path}: column '{name}' ({column.type}) cannot be converted to "
                                 f"{target}, its type in other files: {_short(err)}") from None
        return pa.table(columns)
