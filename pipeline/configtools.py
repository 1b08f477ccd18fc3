"""Typed configs that fail loudly: the one loader of the pipeline's and the trainer's configs.

Every config is a dataclass. `build` makes one from a parsed mapping and refuses an unknown key
(with a did-you-mean), a missing required key, a wrong type, a value outside its range or a choice
outside its `Literal` before any work starts, naming the dotted key (`download.timeout`);
`from_mapping` puts the file's name before that. Reading the YAML file and `--set` overrides live
in pipeline/config_yaml.py.

The valid range of a number is declared on its field, `threshold: float = ranged(0.5, "[0, 1]")`.
NaN and infinity are refused for every float. A `__post_init__` check about one field raises
`FieldError`. Values appear in messages through `short_repr` only: a YAML alias bomb is a few
hundred bytes whose full repr is gigabytes.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from typing import Any, Mapping, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")

SEED_RANGE = "[0, 4294967295]"  # numpy's and torch's seeds alike take any 32-bit unsigned value
_RANGE_METADATA = "range"
_RANGE_SYNTAX = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               type(None): "null"}


class ConfigError(UserError, ValueError):
    """A config that cannot be used: one line naming the file and the dotted key (exit 2)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key  # the dotted key the message is about, "" when none


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
        raise ConfigError(f"{key}: {short_repr(value)} is out of range {spec.text}", key)
    if not finite:
        raise ConfigError(f"{key}: {short_repr(value)} is not a finite number", key)


def to_float(value: int | float) -> float:
    """An integer past float's range becomes an infinity, which the range check then refuses."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _expected(tp: Any) -> str:
    """How a message names what annotation `tp` accepts: 'an integer', 'a string or a list'."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return _KIND_NAMES.get(tp) or getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) in (list, tuple):
        return isinstance(value, (list, tuple))
    return tp is Any or isinstance(value, typing.get_origin(tp) or tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting only where no information is lost.

    A list is checked item by item and fails on its first wrong item, so a shared (aliased)
    structure is never walked further than one path into it.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if value is None and len(options) < len(args):
            return None
        failures = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                failures.append(err)
        # A value of the right shape that failed inside (a list's item) says more than the union.
        deeper = [err for err in failures if err.key != where]
        if len(options) == 1 or deeper:
            raise (deeper or failures)[0]
        raise ConfigError(f"{where}: expected {_expected(tp)}, got {describe(value)}", where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {short_repr(value)}", where)
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if not _matches(value, tp):
        raise ConfigError(f"{where}: expected {_expected(tp)}, got {describe(value)}", where)
    if origin in (list, tuple):
        return [_coerce(item, args[0] if args else Any, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict and len(args) == 2:
        return {str(k): _coerce(v, args[1], join_key(where, k)) for k, v in value.items()}
    return to_float(value) if tp is float else value


def _unknown_key(cls: type, where: str, key: Any, known: list[str]) -> ConfigError:
    # A class may name keys it replaced, so an old config gets told what to write instead.
    replaced = getattr(cls, "REPLACED_KEYS", {}).get(key)
    if replaced:
        return ConfigError(f"{join_key(where, key)} was replaced: {replaced}", join_key(where, key))
    # difflib is quadratic in the key's length: only a key a person could have typed is compared.
    close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) and len(key) <= 100 else []
    hint = f", did you mean {join_key(where, close[0])}?" if close else ""
    return ConfigError(f"unknown key {join_key(where, key)}{hint} (known keys here: {', '.join(sorted(known))})",
                       join_key(where, key))


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Dataclass `cls` from mapping `data`; a ConfigError names the dotted key below `where`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the top level'}: expected a mapping, got {describe(data)}", where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise _unknown_key(cls, where, unknown[0], list(fields))
    kwargs = {}
    for name, field in fields.items():
        key = join_key(where, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
            check_value(key, kwargs[name], field_range(field))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}", key)
    try:
        return cls(**kwargs)
    except ConfigError:  # a __post_init__ that built a section of its own
        raise
    except FieldError as err:  # a __post_init__ check that names its field
        key = join_key(where, err.field)
        raise ConfigError(f"{key}: {err.message}", key) from None
    except (ValueError, TypeError) as err:  # other __post_init__ validation
        raise ConfigError(f"{where or 'config'}: {clip(str(err))}", where) from None


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, source: str = "<config>") -> T:
    """Build dataclass `cls` from `data`; errors are prefixed with `source` (the file)."""
    try:
        return build(cls, {} if data is None else data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}", err.key) from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain mapping of a config, as written into every run's output folder."""
    return dataclasses.asdict(config)
