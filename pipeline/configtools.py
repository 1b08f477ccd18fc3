"""Typed configs from YAML that fail loudly.

Every config is a dataclass. `from_mapping` builds one from a parsed YAML mapping and refuses an
unknown key, a wrong type, a value outside its range or a missing required value before any work
starts, naming the file and the dotted key (`run.output`, `download.timeout`).

The valid range of a number is declared on its field, `threshold: float = ranged(0.5, "[0, 1]")`,
and read by both loaders (this one and filip/config.py); a choice is a `Literal` type. NaN and
infinity are refused for every float. `read_yaml` refuses a key given twice and keeps PyYAML's safe
loading (no `!!python` tags). Values appear in messages through `short_repr` only: a YAML alias
bomb is a few hundred bytes whose full repr is gigabytes.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pipeline.errors import UserError

T = TypeVar("T")

SEED_RANGE = "[0, 4294967295]"  # numpy's and torch's seeds alike take any 32-bit unsigned value
MAX_MERGED_KEYS = 10_000  # YAML merge keys (<<) can multiply entries as aliases multiply items
_RANGE_METADATA = "range"
_RANGE_SYNTAX = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")


class ConfigError(UserError, ValueError):
    """A config file that cannot be used: the message names the file and the key."""


class FieldError(ValueError):
    """A `__post_init__` check about one field; the loader puts the section's dotted path before it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval written as it is printed: "[0, 1]" (closed), "(0, inf)" (open), "[1, inf)"."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        match = _RANGE_SYNTAX.match(text)
        if not match:
            raise ValueError(f"not a range: {text!r}")  # a programming error, raised at import
        opening, low, high, closing = match.groups()
        return cls(text, float(low), float(high), opening == "[", closing == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def ranged(default: Any = dataclasses.MISSING, spec: str = "(-inf, inf)", *,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers (a list's items, each) must lie in `spec`, checked at load."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_RANGE_METADATA: Range.parse(spec)})


def field_range(field: dataclasses.Field) -> Range | None:
    return field.metadata.get(_RANGE_METADATA)


class _ShortRepr(reprlib.Repr):
    """reprlib walks at most maxlevel deep and maxlist wide, so the cost is fixed, not the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 4
        self.maxstring = 60
        self.maxlong = 40
        self.maxother = 60

    def repr_bytes(self, value: bytes, level: int) -> str:
        return f"<{len(value)} bytes>"


_SHORT_REPR = _ShortRepr()


def clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 100) -> str:
    """A repr of bounded length and bounded cost, whatever `value` holds or shares."""
    return clip(_SHORT_REPR.repr(value), limit)


def describe(value: Any) -> str:
    """`int 5`, `str 'many'`, `list [[...], [...], ...]`: what a type error shows of a value."""
    return f"{type(value).__name__} {short_repr(value)}"


def short_key(key: Any) -> str:
    return clip(key if isinstance(key, str) else short_repr(key), 60)


def join_key(where: str, key: Any) -> str:
    return f"{where}.{short_key(key)}" if where else short_key(key)


def check_value(key: str, value: Any, spec: Range | None) -> None:
    """Refuse a float that is NaN or infinite and a number outside `spec`; a list item by item."""
    if isinstance(value, (list, tuple)):  # already coerced: as long as the file wrote it, no longer
        for index, item in enumerate(value):
            check_value(f"{key}[{index}]", item, spec)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    finite = not isinstance(value, float) or math.isfinite(value)
    if spec is not None and not (finite and value in spec):
        raise ConfigError(f"{key}: {short_repr(value)} is out of range {spec.text}")
    if not finite:
        raise ConfigError(f"{key}: {short_repr(value)} is not a finite number")


def to_float(value: int | float) -> float:
    """An integer past float's range becomes an infinity, which the range check then refuses."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting only where no information is lost.

    A list is checked item by item and fails on its first wrong item, so a shared (aliased)
    structure is never walked further than one path into it.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {describe(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {describe(value)}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {describe(value)}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {describe(value)}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, join_key(where, k)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {describe(value)}")
        return to_float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {describe(value)}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {describe(value)}")
    return value


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        # A class may name keys it replaced, so an old config gets told what to write instead.
        replaced = getattr(cls, "REPLACED_KEYS", {}).get(unknown[0])
        if replaced:
            raise ConfigError(f"{join_key(where, unknown[0])} was replaced: {replaced}")
        raise ConfigError(
            f"unknown key {join_key(where, unknown[0])} (known keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, field in fields.items():
        key = join_key(where, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
            check_value(key, kwargs[name], field_range(field))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    try:
        return cls(**kwargs)
    except FieldError as err:  # a __post_init__ check that names its field
        raise ConfigError(f"{join_key(where, err.field)}: {err.message}") from None
    except (ValueError, TypeError) as err:  # other __post_init__ validation
        raise ConfigError(f"{where or 'config'}: {clip(str(err))}") from None


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, source: str = "<config>") -> T:
    """Build dataclass `cls` from `data`; errors are prefixed with `source` (the file)."""
    try:
        return _build(cls, data or {}, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


class DuplicateKeyError(yaml.YAMLError):
    """One mapping names a key twice; PyYAML alone would keep the last value silently."""


# libyaml's parser when PyYAML has it: it limits nesting depth (the pure-Python parser recurses
# until Python's limit, after seconds) and is faster. Either way SafeConstructor builds the values.
_SAFE_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SAFE_LOADER):  # type: ignore[misc, valid-type]
    """PyYAML's safe loader that also refuses duplicate keys and merges past MAX_MERGED_KEYS.

    It remembers each node's dotted key so that a message can name it. Aliased nodes are built once
    and shared, and every walk here visits a node once, so a bomb costs what its text does.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(node) -> dotted key of its first use
        self._merged_sizes: dict[int, int] = {}

    def _merged_size(self, node: yaml.MappingNode) -> int:
        if id(node) not in self._merged_sizes:
            size = 0
            for key_node, value_node in node.value:
                if key_node.tag != "tag:yaml.org,2002:merge":
                    size += 1
                    continue
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                size += sum(self._merged_size(s) for s in sources if isinstance(s, yaml.MappingNode))
            self._merged_sizes[id(node)] = size
        return self._merged_sizes[id(node)]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        path = self._paths.get(id(node), "")
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a collection key is unhashable: the base class reports it
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise DuplicateKeyError(f"duplicate key {join_key(path, key)} (lines {lines[key]} and {line})")
            lines[key] = line
            self._paths.setdefault(id(value_node), join_key(path, key))
        if self._merged_size(node) > MAX_MERGED_KEYS:
            raise DuplicateKeyError(f"{path or 'the top level'}: merge keys (<<) expand to more than "
                                    f"{MAX_MERGED_KEYS} entries")
        return super().construct_mapping(node, deep)

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        path = self._paths.get(id(node), "")
        for index, child in enumerate(node.value):
            self._paths.setdefault(id(child), f"{path}[{index}]")
        return super().construct_sequence(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: PyYAML's own message spans lines and quotes the text around the problem."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        text = f"{where}{' '.join(part for part in (err.context, err.problem) if part)}"
    else:
        text = str(err)
    return clip(" ".join(text.split()))


def read_yaml(path: str | Path) -> Any:
    """Parse one YAML file safely; ConfigError (naming the file) for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the file: {clip(str(err))}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    except (ValueError, RecursionError) as err:  # an integer past Python's digit limit; deep nesting
        # Python's own advice after ';' (set_int_max_str_digits) is not for a config's author.
        problem = str(err).split(";")[0] or type(err).__name__
        raise ConfigError(f"{path}: not a usable config: {clip(problem)}") from None


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None, source: str) -> None:
    """Set each dotted key of `overrides` in `data`, creating sections that are absent."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{source}: {where}: expected a mapping to set {dotted} in, "
                                  f"got {describe(node)}")
        node[leaf] = value


def load_yaml(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
    """Load `path` into `cls`; `overrides` maps dotted keys to values applied on top of the file."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(data, overrides, str(path))
    return from_mapping(cls, data, str(path))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain mapping of a config, as written into every run's output folder."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
