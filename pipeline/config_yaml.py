"""Config files and `--set KEY=VALUE` options, read strictly into the typed configs of configtools.

`read_yaml` keeps PyYAML's safe loading (no `!!python` tags) and also refuses a key given twice and
merge keys (<<) that expand past MAX_MERGED_KEYS. `load_yaml` applies dotted-key overrides on top of
the file before the one loader checks the whole: `filip build`, `filip demo` and `filip train` take
the same `--set` option and answer the same mistake with the same one-line message.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pipeline.configtools import ConfigError, clip, describe, from_mapping, join_key, short_repr, to_dict

T = TypeVar("T")

MAX_MERGED_KEYS = 10_000  # YAML merge keys (<<) can multiply entries as aliases multiply items
SET_HELP = "override a config key, e.g. --set run.seed=1 (dotted KEY, YAML VALUE; repeatable)"


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


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML `text` strictly; a ConfigError starting with `source` for anything unusable."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from None
    except (ValueError, RecursionError) as err:  # an integer past Python's digit limit; deep nesting
        # Python's own advice after ';' (set_int_max_str_digits) is not for a config's author.
        problem = str(err).split(";")[0] or type(err).__name__
        raise ConfigError(f"{source}: not a usable config: {clip(problem)}") from None


def read_yaml(path: str | Path) -> Any:
    """Parse one YAML file safely; ConfigError (naming the file) for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the file: {clip(str(err))}") from None
    return parse_yaml(text, str(path))


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
                                  f"got {describe(node)}", where)
        node[leaf] = value


def load_yaml(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
    """Load `path` into `cls`; `overrides` maps dotted keys to values applied on top of the file."""
    data = read_yaml(path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level: expected a mapping, got {describe(data)}")
    apply_overrides(data, overrides, str(path))
    return from_mapping(cls, data, str(path))


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """The `--set KEY=VALUE` option of every command that reads a config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set",
                        help=SET_HELP)


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """`['run.seed=1', ...]` as {dotted key: YAML value}; a ConfigError naming the bad option."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not all(part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"--set {short_repr(item, 80)}: expected KEY=VALUE with a dotted KEY, "
                              "e.g. --set run.seed=1")
        overrides[key] = parse_yaml(value, f"--set {key}")
    return overrides


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
