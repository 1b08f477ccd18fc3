"""The stage registry: a stage is its own module, registered with one call.

Each per-shard stage module (`pipeline/download.py` and every module in `pipeline/stages/`) calls
`register_stage(StageSpec(...))` at import. The spec says everything the pipeline needs to know:
the stage's name (its `stages:` entry and output folder), its YAML section and config class, the
columns it writes, whether it reads image bytes, which stages must run before it, how to build it,
what it checks before any work and what it adds to the HTML report. `filip build` runs the stages
in the order of the config's `stages:` list; `pipeline/config.py` builds the config schema (one
section per registered stage) from here, so adding a stage touches no shared module.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pipeline.stage import Stage
    from pipeline.storage import Storage

# The stage that fetches images: a stage that reads image bytes must come after it.
IMAGES_FROM = "download"


@dataclass(frozen=True)
class StageContext:
    """What a stage is built with besides its own section: the run and the stage before it."""

    output: str
    input_stage: str  # the folder whose kept rows this stage reads ("input" for the first)
    config: Any  # the whole PipelineConfig, for the few stages that need run-level settings


@dataclass(frozen=True)
class StageSpec:
    """A registered stage. `build(section, context)` returns the Stage objects it runs as, in order
    (most stages are one; a stage with a run-wide step, such as a global quantile, may be two)."""

    name: str
    section: str  # its YAML section
    config: type  # the section's dataclass; an `enabled: false` field there skips a listed stage
    build: Callable[[Any, StageContext], list["Stage"]]
    columns: tuple[str, ...] = ()  # the columns it adds to its rows
    needs_images: bool = False  # reads image bytes, so it must come after IMAGES_FROM
    after: tuple[str, ...] = ()  # stages that must run before it (e.g. dedup needs inspect's phash)
    check: Callable[[Any], None] | None = None  # before any work: a missing model fails here
    report: Callable[["Storage", dict], str] | None = None  # an HTML section for `filip stats --html`
    description: str = ""
    output_folders: tuple[str, ...] = field(default=())  # folders besides `name` it writes


_REGISTRY: dict[str, StageSpec] = {}
_LOADED = False


def register_stage(spec: StageSpec) -> StageSpec:
    """Add a stage to the registry (at its module's import); a second stage of that name is a bug."""
    found = _REGISTRY.get(spec.name)
    if found is not None and found.build is not spec.build:
        raise ValueError(f"stage {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registered_stages() -> dict[str, StageSpec]:
    """Every registered stage by name, importing the stage modules on first use."""
    global _LOADED
    if not _LOADED:
        import pipeline.stages

        importlib.import_module("pipeline.download")
        for module in pkgutil.iter_modules(pipeline.stages.__path__):
            importlib.import_module(f"pipeline.stages.{module.name}")
        _LOADED = True
    return _REGISTRY


def check_stage_order(names: list[str]) -> str | None:
    """What is wrong with a `stages:` list (None: nothing): unknown or repeated names, a stage
    before one it needs, a stage reading images before they are downloaded."""
    specs = registered_stages()
    for name in names:
        if name not in specs:
            close = difflib.get_close_matches(str(name), list(specs), n=1)
            hint = f", did you mean {close[0]}?" if close else ""
            return f"unknown stage {name!r}{hint} (registered: {', '.join(sorted(specs))})"
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"stage {repeated[0]!r} is listed twice"
    if IMAGES_FROM not in names:
        return f"{IMAGES_FROM} must be listed: the final shards are cut from its image tars"
    for position, name in enumerate(names):
        spec = specs[name]
        if spec.needs_images and position < names.index(IMAGES_FROM):
            return f"{name} reads images, so it must come after {IMAGES_FROM}"
        for needed in spec.after:
            if needed not in names[:position]:
                return f"{name} needs {needed} before it"
    return None
