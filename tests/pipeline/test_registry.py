"""The stage registry: the config's `stages:` list orders the pipeline and is checked at load."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.build import pipeline_stages
from pipeline.config import DEFAULT_STAGES, ConfigError, PipelineConfig, config_from_dict
from pipeline.registry import registered_stages
from pipeline.schema import reserved_columns

RUN = {"input": "urls.csv", "output": "out"}


def _config(**sections) -> PipelineConfig:
    return config_from_dict({"run": RUN, **sections})


def test_every_registered_stage_brings_its_config_section() -> None:
    specs = registered_stages()
    assert {"download", "inspect", "dedup", "unsafe", "backtranslate", "caption_language",
            "filip_score"} <= set(specs)
    fields = {f.name: f.type for f in dataclasses.fields(PipelineConfig)}
    for spec in specs.values():
        assert fields[spec.section] is spec.config, spec.name
    assert reserved_columns() >= {"caption_lang", "filip_score", "unsafe_score", "phash", "caption_bt_de"}


def test_the_default_order_is_todays_pipeline() -> None:
    stages, skipped = pipeline_stages(_config())
    assert [s.name for s in stages] == list(DEFAULT_STAGES) and skipped == []
    assert [getattr(s, "input_stage", "input") for s in stages[1:]] == list(DEFAULT_STAGES[:-1])


def test_order_comes_from_the_config_and_each_stage_reads_the_one_before() -> None:
    config = _config(stages=["caption_language", "download", "inspect", "filip_score"],
                     filip_score={"checkpoint": "model.pt"})
    stages, _ = pipeline_stages(config)
    assert [(s.name, getattr(s, "input_stage", None)) for s in stages] == [
        ("caption_language", "input"), ("download", "caption_language"), ("inspect", "download"),
        ("filip_score", "inspect"), ("filip_cut", "filip_score")]


def test_a_listed_stage_switched_off_is_skipped_in_place() -> None:
    stages, skipped = pipeline_stages(_config(unsafe={"enabled": False}))
    assert "unsafe" not in [s.name for s in stages] and skipped == ["unsafe"]
    assert stages[-1].input_stage == "dedup"  # back-translation reads what dedup kept


@pytest.mark.parametrize("order, message", [
    (["download", "inspekt"], "stages: unknown stage 'inspekt', did you mean inspect?"),
    (["download", "inspect", "inspect"], "stages: stage 'inspect' is listed twice"),
    (["inspect", "download"], "stages: inspect reads images, so it must come after download"),
    (["download", "dedup", "inspect"], "stages: dedup needs inspect before it"),
    (["caption_language"], "stages: download must be listed"),
])
def test_a_wrong_order_fails_at_load_naming_the_problem(order: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(stages=order)
    assert message in str(caught.value)


def test_the_wrong_order_is_refused_by_the_cli_before_any_work(tmp_path) -> None:
    from tests.bad_input.cli import assert_user_error, run_filip

    config = tmp_path / "build.yaml"
    config.write_text(f"run: {{input: {tmp_path / 'urls.csv'}, output: {tmp_path / 'out'}}}\n"
                      "stages: [unsafe, download]\n")
    result = run_filip("build", str(config))
    assert_user_error(result, "stages: unsafe reads images, so it must come after download")
    assert not (tmp_path / "out").exists()
