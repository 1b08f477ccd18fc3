"""Bad configs through the real `filip build` and `filip train`: one `error:` line naming the file,
the key, the value and the valid range, exit 2, and no work done (no output folder contents).

Every case fails while the config loads, before Ray or torch work starts, so each run takes about
as long as Python's start.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.bad_input.cli import assert_user_error, run_filip
from tests.yaml_bombs import alias_bomb

RUN = "run: {input: urls.csv, output: ignored}\n"


# (id, config text after the run section, texts the one error line must contain)
BUILD_CASES = [
    ("threshold-negative", "unsafe: {threshold: -1}\n", ["unsafe.threshold: -1.0 is out of range [0, 1]"]),
    ("threshold-above-one", "unsafe: {threshold: 7.5}\n", ["unsafe.threshold: 7.5 is out of range [0, 1]"]),
    ("threshold-nan", "unsafe: {threshold: .nan}\n", ["unsafe.threshold: nan is out of range [0, 1]"]),
    ("hamming-999", "dedup: {hamming_threshold: 999}\n",
     ["dedup.hamming_threshold: 999 is out of range [0, 63]"]),
    ("timeout-negative", "download: {timeout: -1}\n", ["download.timeout: -1.0 is out of range (0, inf)"]),
    ("timeout-inf", "download: {timeout: .inf}\n", ["download.timeout: inf is out of range (0, inf)"]),
    ("thread-count-0", "download: {thread_count: 0}\n",
     ["download.thread_count: 0 is out of range [1, inf)"]),
    ("retries-negative", "download: {retries: -2}\n", ["download.retries: -2 is out of range [0, inf)"]),
    ("encode-quality-500", "download: {encode_quality: 500}\n",
     ["download.encode_quality: 500 is out of range [0, 100]"]),
    ("aspect-ratio-0", "inspect: {resolution: {max_aspect_ratio: 0}}\n",
     ["inspect.resolution.max_aspect_ratio: 0.0 is out of range [1, inf)"]),
    ("max-chars-0", "inspect: {caption: {max_chars: 0}}\n",
     ["inspect.caption.max_chars: 0 is out of range [1, inf)"]),
    ("resize-mode", "download: {resize_mode: stretch}\n", ["download.resize_mode: expected one of [", "'stretch'"]),
    ("unsafe-class", "unsafe: {classes: [TOES]}\n", ["unsafe.classes[0]: expected one of [", "'TOES'"]),
    ("duplicate-key", "download:\n  timeout: 5\n  retries: 1\n  timeout: 9\n",
     ["duplicate key download.timeout (lines 3 and 5)"]),
    ("duplicate-section", "dedup: {enabled: true}\ndedup: {enabled: false}\n",
     ["duplicate key dedup (lines 2 and 3)"]),
    ("alias-bomb-number", f"unsafe: {{threshold: {alias_bomb()}}}\n",
     ["unsafe.threshold: expected a number, got list [[[...], "]),
    ("alias-bomb-list", f"download: {{allow_networks: {alias_bomb()}}}\n",
     ["download.allow_networks[0]: expected a string, got list [[[...], "]),
]


@pytest.mark.parametrize("body, must_name", [case[1:] for case in BUILD_CASES],
                         ids=[case[0] for case in BUILD_CASES])
def test_bad_build_config_fails_before_any_work(tmp_path: Path, body: str, must_name: list[str]) -> None:
    config, output = tmp_path / "bad.yaml", tmp_path / "out"
    config.write_text(RUN + body)
    assert config.stat().st_size < 700  # the bombs too: a few hundred bytes
    started = time.monotonic()
    result = run_filip("build", config, "--output", output, timeout=60)
    elapsed = time.monotonic() - started
    line = assert_user_error(result, f"error: {config}: ", *must_name)
    assert len(line) < 700
    assert not output.exists()  # not even created: nothing was downloaded or written
    assert elapsed < 30  # Python's start and the imports; an expanded bomb would take minutes


def test_python_tag_is_refused_and_never_run(tmp_path: Path) -> None:
    config, marker = tmp_path / "bad.yaml", tmp_path / "ran"
    config.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run_filip("build", config, "--output", tmp_path / "out", timeout=60)
    assert_user_error(result, f"error: {config}: not valid YAML: line 1, column 6: could not determine a "
                              "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


TRAIN = ("model: {preset: tiny}\ndata: {shards: SHARDS, batch_size: 8}\noptim: {lr: 0.01}\n"
         "run: {output_dir: OUT, max_steps: 2}\n")

TRAIN_CASES = [
    ("batch-size-0", ("batch_size: 8", "batch_size: 0"), ["data.batch_size: 0 is out of range [1, inf)"]),
    ("keep-ratio-nan", ("lr: 0.01", "lr: 0.01}\nloss: {token_keep_ratio: .nan"),
     ["loss.token_keep_ratio: nan is out of range (0, 1]"]),
    ("duplicate-key", ("lr: 0.01", "lr: 0.01, lr: 0.02"), ["duplicate key optim.lr (lines 3 and 3)"]),
    ("model-heads", ("preset: tiny", "preset: tiny, text_heads: 3"),
     ["model.text_heads: 3 does not divide model.text_width 64"]),
]


@pytest.mark.parametrize("edit, must_name", [case[1:] for case in TRAIN_CASES],
                         ids=[case[0] for case in TRAIN_CASES])
def test_bad_train_config_fails_before_any_work(tmp_path: Path, edit: tuple[str, str],
                                                must_name: list[str]) -> None:
    config, output = tmp_path / "bad.yaml", tmp_path / "run"
    text = TRAIN.replace("SHARDS", str(tmp_path / "shards")).replace("OUT", str(output))
    config.write_text(text.replace(*edit))
    result = run_filip("train", config, timeout=120)
    assert_user_error(result, f"error: {config}: ", *must_name)
    assert not output.exists()
