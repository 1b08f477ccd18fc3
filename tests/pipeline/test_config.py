from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "cluster-example.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert isinstance(config, PipelineConfig)
    assert config.run.shard_size > 0


def test_cluster_example_is_cluster_shaped() -> None:
    config = load_config(CONFIGS / "cluster-example.yaml")
    assert config.run.output.startswith("s3://")
    assert config.download.allow_networks == []  # public addresses only
    assert config.run.ray_address == "auto"
    # Its ~147M rows are past the in-driver search, so the example sizes the shuffle's waves.
    assert config.dedup.single_machine_max_rows < 147_000_000 and config.dedup.tables_per_shuffle


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv, output: out}\ndownload: {timeoutt: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key download\.timeoutt"):
        load_config(path)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv, output: out, shard_size: many}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: run\.shard_size: expected an integer"):
        load_config(path)


def test_missing_required_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: missing required key run\.output"):
        load_config(path)


def test_invalid_value_and_literal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.shard_size must be at least 1"):
        load_config(_write(tmp_path, "run: {input: a, output: b, shard_size: 0}\n"))
    with pytest.raises(ConfigError, match=r"download\.resize_mode: expected one of"):
        load_config(_write(tmp_path, "run: {input: a, output: b}\ndownload: {resize_mode: stretch}\n"))
    with pytest.raises(ConfigError, match=r"dedup\.single_machine_max_rows must be 0 or more"):
        load_config(_write(tmp_path, "run: {input: a, output: b}\ndedup: {single_machine_max_rows: -1}\n"))


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply(tmp_path: Path) -> None:
    path = _write(tmp_path, "run: {input: a.csv, output: out}\n")
    config = load_config(path, {"run.output": "elsewhere", "download.timeout": 3})
    assert config.run.output == "elsewhere"
    assert config.download.timeout == 3.0
