"""Back-translation plumbing on tiny random MarianMT models built by the tests (tests/tiny_marian.py)."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from filters.backtranslation import (
    BackTranslationConfig, BackTranslator, MissingModelError, check_models, degenerate_reason)
from tests.tiny_marian import DIRECTIONS, build_tiny_marian, build_tiny_marian_models

# Thresholds off: random tiny models babble, and the plumbing tests must see the raw outputs.
RAW = dict(max_ngram_repeats=0, max_length_ratio=1e6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run far faster without OpenMP threads fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(flickr_dir: Path) -> list[str]:
    with open(flickr_dir / "captions.csv", newline="") as f:
        return [row["caption"] for row in csv.DictReader(f)][:600]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> dict[str, str]:
    return build_tiny_marian_models(tmp_path_factory.mktemp("tiny_marian"), corpus)


@pytest.fixture(scope="session")
def repeating_model(tiny_models: dict[str, str]) -> str:
    """A tiny model whose greedy output is one word repeated until max_new_tokens."""
    root = Path(tiny_models["en_de"]).parent
    vocab = json.loads((Path(tiny_models["en_de"]) / "vocab.json").read_text())
    word = next(p for p in vocab if p.startswith("▁") and p[1:].isalpha() and len(p) > 3)
    return build_tiny_marian(root / "repeating", root / "shared.spm", seed=7, repeat_piece=word)


def make(models: dict[str, str], **overrides: object) -> BackTranslator:
    overrides.setdefault("device", "cpu")  # deterministic float32 everywhere; the GPU test sets its own
    translator = BackTranslator(BackTranslationConfig(models=dict(models), **overrides))
    translator.setup()
    return translator


def test_degenerate_reason_rules() -> None:
    assert degenerate_reason("a dog runs", "") == "empty"
    assert degenerate_reason("a dog runs", "   ") == "empty"
    assert degenerate_reason("a dog runs", "the dog the dog the dog the dog runs") == "repetition"
    assert degenerate_reason("a dog runs", "dog dog dog dog") == "repetition"
    assert degenerate_reason("a dog runs", "dog dog dog", max_ngram_repeats=4) is None
    assert degenerate_reason("a dog", "one two three four five six seven eight nine ten eleven") == "too_long"
    assert degenerate_reason("a dog runs on the grass", "a dog is running on grass") is None


def test_order_preserved_after_length_sorting(tiny_models: dict[str, str], corpus: list[str]) -> None:
    # Lengths deliberately interleaved so that sorting by token length really reorders the inputs.
    captions = sorted(corpus[:24], key=lambda c: (len(c) % 3, c))
    batched = make(tiny_models, batch_size=5, max_new_tokens=12, cache_size=0, **RAW).translate(captions)
    alone = make(tiny_models, batch_size=1, max_new_tokens=12, cache_size=0, **RAW)
    singles = [alone.translate([c]) for c in captions]
    assert batched.de == [s.de[0] for s in singles]
    assert batched.ru == [s.ru[0] for s in singles]
    assert len(set(batched.de)) > 5  # the outputs depend on the input, so a mix-up would show


def test_fast_engine_matches_generate(tiny_models: dict[str, str], corpus: list[str]) -> None:
    captions = corpus[100:148]
    fast = make(tiny_models, engine="fast", batch_size=16, max_new_tokens=20, **RAW)
    plain = make(tiny_models, engine="generate", batch_size=16, max_new_tokens=20, **RAW)
    assert fast._directions["en_de"].fast is not None and plain._directions["en_de"].fast is None
    a, b = fast.translate(captions), plain.translate(captions)
    assert (a.de, a.ru) == (b.de, b.ru)
    matmul = make(tiny_models, engine="fast", fast_attention="matmul", batch_size=16, max_new_tokens=20, **RAW)
    c = matmul.translate(captions)
    assert (c.de, c.ru) == (b.de, b.ru)


def test_repeated_caption_translated_once(tiny_models: dict[str, str], corpus: list[str]) -> None:
    translator = make(tiny_models, max_new_tokens=8, **RAW)
    a, b = corpus[0], corpus[1]
    first = translator.translate([a, b, "  " + a.upper() + " ", a])
    assert first.counters["cache_misses"] == 2 and first.counters["cache_hits"] == 2
    assert first.counters["translated"] == 2
    assert first.counters["model_inputs"] == 2 * 4  # two unique captions through four models
    assert first.de[0] == first.de[2] == first.de[3] and first.ru[0] == first.ru[3]
    again = translator.translate([a])
    assert again.counters["cache_hits"] == 1 and again.counters["model_inputs"] == 0
    assert again.de == [first.de[0]]


def test_truncation_counted(tiny_models: dict[str, str], corpus: list[str]) -> None:
    long_caption = " ".join(corpus[:5])
    # Pivot outputs stay within 6 + EOS tokens, so only the two English inputs exceed the limit.
    result = make(tiny_models, max_input_tokens=8, max_new_tokens=6, **RAW).translate(
        [long_caption, "A dog ."])
    assert result.counters["truncated"] == 2


def test_degenerate_output_is_null_with_its_reason(tiny_models: dict[str, str], repeating_model: str,
                                                  corpus: list[str]) -> None:
    captions = corpus[200:210]
    models = {**tiny_models, "de_en": repeating_model}
    result = make(models, max_new_tokens=16).translate(captions + captions[:2])  # two rows from the cache
    assert result.de == [None] * 12 and result.de_reason == ["degenerate"] * 12
    assert all((text is None) == (reason == "degenerate") and (reason in (None, "degenerate"))
               for text, reason in zip(result.ru, result.ru_reason))
    assert not any(text in captions for text in result.ru)  # never a copy of the original
    # Rules count once per translated caption and pivot; null rows once per row.
    assert result.counters["translated"] == len(captions)
    assert result.counters["fallback_repetition"] >= len(captions)
    assert sum(v for k, v in result.counters.items() if k.startswith("fallback_")) == \
        len(captions) + result.ru[:10].count(None)
    assert result.counters["degenerate_rows_de"] == 12
    assert result.counters["degenerate_rows_ru"] == result.ru.count(None)
    short = ["A dog .", "Two men ."]
    too_long = make(models, max_new_tokens=16, max_ngram_repeats=0).translate(short)
    assert too_long.de == [None, None] and too_long.de_reason == ["degenerate"] * 2
    assert too_long.counters["fallback_too_long"] >= 2


def test_good_output_has_no_reason(tiny_models: dict[str, str], corpus: list[str]) -> None:
    result = make(tiny_models, max_new_tokens=8, **RAW).translate(corpus[:6])
    for texts, reasons in ((result.de, result.de_reason), (result.ru, result.ru_reason)):
        assert [r is None for r in reasons] == [isinstance(t, str) and t.strip() != "" for t in texts]
    assert sum(r is None for r in result.de_reason + result.ru_reason) >= 10  # only empty ones are null
    assert result.counters["degenerate_rows_de"] == result.de.count(None)
    assert result.counters["degenerate_rows_ru"] == result.ru.count(None)


def test_disabled_mode_skips_everything(tmp_path: Path) -> None:
    missing = {d: str(tmp_path / "absent" / d) for d in ("en_de", "de_en", "en_ru", "ru_en")}
    translator = BackTranslator(BackTranslationConfig(enabled=False, models=missing))
    translator.setup()  # no model check, no loading
    result = translator.translate(["A dog .", "A cat ."])
    assert result.de == result.ru == ["A dog .", "A cat ."]
    assert result.counters["skipped"] == 2 and result.counters["translated"] == 0


def test_missing_model_is_a_clear_error(tiny_models: dict[str, str], tmp_path: Path) -> None:
    absent = str(tmp_path / "nowhere" / "opus-mt-de-en")
    config = BackTranslationConfig(models={**tiny_models, "de_en": absent,
                                           "ru_en": "no-such-org/opus-mt-ru-en-missing"})
    with pytest.raises(MissingModelError) as error:
        BackTranslator(config).setup()
    message = str(error.value)
    assert f"backtranslation.models.de_en: local model folder {absent!r} does not exist" in message
    assert "backtranslation.models.ru_en: hub model 'no-such-org/opus-mt-ru-en-missing'" in message
    assert "en_de" not in message
    check_models(dataclasses.replace(config, models=tiny_models))  # the present ones pass


@pytest.mark.gpu
def test_cuda_graph_engine_matches_generate(tiny_models: dict[str, str], corpus: list[str]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    captions = corpus[300:364]
    common = dict(device="cuda", dtype="float32", batch_size=16, max_new_tokens=20, **RAW)
    graphs = make(tiny_models, engine="fast", cuda_graphs=True, **common)
    plain = make(tiny_models, engine="generate", **common)
    assert graphs._directions["en_de"].fast.use_graphs
    a, b = graphs.translate(captions), plain.translate(captions)
    assert (a.de, a.ru) == (b.de, b.ru)


def test_auto_engine_on_cpu_is_ctranslate2(tiny_models: dict[str, str]) -> None:
    from filters.backtranslation.config import AUTO_COMPUTE_TYPE, AUTO_ENGINE

    assert (AUTO_ENGINE["cpu"], AUTO_COMPUTE_TYPE["cpu"]) == ("ctranslate2", "float32")
    translator = make(tiny_models, max_new_tokens=8, **RAW)
    assert translator.engines == {d: "ctranslate2" for d in DIRECTIONS}
    assert make(tiny_models, engine="transformers", **RAW).engines == {d: "fast" for d in DIRECTIONS}
    assert make(tiny_models, engine="transformers", num_beams=2, **RAW).engines == {d: "generate" for d in DIRECTIONS}


def test_ctranslate2_float32_matches_generate(tiny_models: dict[str, str], repeating_model: str,
                                              corpus: list[str]) -> None:
    captions = corpus[100:148] + [" ".join(corpus[:5])]  # one input truncated to max_input_tokens
    common = dict(batch_size=16, max_new_tokens=20, max_input_tokens=32, **RAW)
    ct2 = make(tiny_models, engine="ctranslate2", compute_type="float32", **common)
    plain = make(tiny_models, engine="generate", **common)
    assert ct2.engines == {d: "ctranslate2" for d in DIRECTIONS}
    a, b = ct2.translate(captions), plain.translate(captions)
    assert (a.de, a.ru) == (b.de, b.ru)  # exact: same weights, same float32 greedy arithmetic
    assert len(set(a.de)) > 10 and a.counters == b.counters
    # A runaway model: both stop at max_new_tokens (generate forces EOS as the last token).
    runaway = {**tiny_models, "de_en": repeating_model}
    c = make(runaway, engine="ctranslate2", max_new_tokens=12).translate(captions[:4])
    d = make(runaway, engine="generate", max_new_tokens=12).translate(captions[:4])
    assert (c.de, c.de_reason, c.counters) == (d.de, d.de_reason, d.counters)
    assert c.de == [None] * 4 and c.counters["fallback_repetition"] >= 4


def _one_model_everywhere(folder: str) -> dict[str, str]:
    return {d: folder for d in DIRECTIONS}


def test_conversion_is_cached_beside_the_model_and_redone_when_it_changes(
        tiny_models: dict[str, str], corpus: list[str], tmp_path: Path) -> None:
    spm = Path(tiny_models["en_de"]).parent / "shared.spm"
    folder = build_tiny_marian(tmp_path / "model", spm, seed=11)
    settings = dict(engine="ctranslate2", compute_type="float32", max_new_tokens=12, **RAW)
    first = make(_one_model_everywhere(folder), **settings)
    # The same folder in all four directions: the first load converts, the other three reuse it.
    assert [d.converted for d in first._directions.values()] == [True, False, False, False]
    (converted,) = Path(folder).glob("ct2-float32-*")
    weights_mtime = (converted / "model.bin").stat().st_mtime_ns
    second = make(_one_model_everywhere(folder), **settings)
    assert not any(d.converted for d in second._directions.values())
    assert (converted / "model.bin").stat().st_mtime_ns == weights_mtime
    assert first.translate(corpus[:20]).de == second.translate(corpus[:20]).de
    build_tiny_marian(tmp_path / "model", spm, seed=12)  # new weights in the same folder
    changed = make(_one_model_everywhere(folder), **settings)
    assert [d.converted for d in changed._directions.values()] == [True, False, False, False]
    (reconverted,) = Path(folder).glob("ct2-float32-*")  # the stale conversion is gone
    assert reconverted != converted
    new = make(_one_model_everywhere(folder), engine="generate", max_new_tokens=12, **RAW)
    assert changed.translate(corpus[:20]).de == new.translate(corpus[:20]).de != first.translate(corpus[:20]).de


def test_hub_model_converts_into_the_cache_dir(tiny_models: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import huggingface_hub.constants

    from filters.backtranslation.ct2_engine import converted_model

    # A hub model as the Hugging Face cache stores it: refs/main names the snapshot folder.
    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--opus-mt-en-de"
    shutil.copytree(tiny_models["en_de"], repo / "snapshots" / "0123abc", ignore=shutil.ignore_patterns("ct2-*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    cache = tmp_path / "ct2-cache"
    path, converted = converted_model("tiny-org/opus-mt-en-de", "int8", str(cache))
    assert converted and path.parent.parent == cache
    assert path.parent.name.startswith("tiny-org--opus-mt-en-de-") and path.name.startswith("ct2-int8-")
    assert (path / "model.bin").is_file()
    assert not list(repo.rglob("ct2-*"))  # nothing written into the Hugging Face cache
    assert converted_model("tiny-org/opus-mt-en-de", "int8", str(cache)) == (path, False)


def _convert_after_barrier(folder: str, barrier: Any, results: Any) -> None:
    """An actor's conversion, made to start only once the other process has started its own too."""
    from filters.backtranslation import ct2_engine

    real_convert = ct2_engine._convert

    def convert_together(*args: Any) -> None:
        barrier.wait()
        real_convert(*args)

    ct2_engine._convert = convert_together
    path, converted = ct2_engine.converted_model(folder, "float32")
    results.put((str(path), converted))


def test_concurrent_conversions_leave_one_winner(tiny_models: dict[str, str], tmp_path: Path) -> None:
    import multiprocessing

    spm = Path(tiny_models["en_de"]).parent / "shared.spm"
    folder = build_tiny_marian(tmp_path / "model", spm, seed=14)
    context = multiprocessing.get_context("spawn")  # two processes, as two Ray actors are
    barrier, results = context.Barrier(2, timeout=240), context.Queue()
    workers = [context.Process(target=_convert_after_barrier, args=(folder, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    # Both converted (the barrier saw to it); one rename won, the other process used the winner's.
    assert sorted(converted for _, converted in outcomes) == [False, True]
    assert outcomes[0][0] == outcomes[1][0] and (Path(outcomes[0][0]) / "model.bin").is_file()
    assert sorted(p.name for p in Path(folder).iterdir() if p.name.startswith((".ct2", "ct2"))) == \
        [Path(outcomes[0][0]).name]  # the loser's temporary folder is removed


def test_generation_settings_read_without_torch_match_generation_config(tiny_models: dict[str, str],
                                                                        repeating_model: str, tmp_path: Path) -> None:
    import shutil

    from transformers import GenerationConfig, MarianConfig

    from filters.backtranslation.generation import SETTINGS, read_generation_settings

    folder = Path(tiny_models["en_de"])
    custom = tmp_path / "custom"  # every setting the engines check away from its default
    shutil.copytree(folder, custom)
    settings = json.loads((custom / "generation_config.json").read_text())
    settings.update(bad_words_ids=[[5], [7, 8]], forced_bos_token_id=3, repetition_penalty=1.2,
                    no_repeat_ngram_size=3, suppress_tokens=[4], begin_suppress_tokens=[6])
    (custom / "generation_config.json").write_text(json.dumps(settings))
    older = tmp_path / "older"  # a folder saved before generation_config.json existed
    shutil.copytree(folder, older)
    (older / "generation_config.json").unlink()
    for path in (folder, Path(repeating_model), custom, older):
        reference = (GenerationConfig.from_pretrained(path) if (path / "generation_config.json").exists()
                     else GenerationConfig.from_model_config(MarianConfig.from_pretrained(path)))
        ours = read_generation_settings(path)
        assert {n: getattr(ours, n) for n in SETTINGS} == {n: getattr(reference, n) for n in SETTINGS}, path
    assert read_generation_settings(custom).bad_words_ids == [[5], [7, 8]]  # not the defaults
    from filters.backtranslation.generation import unsupported_generation_options

    assert unsupported_generation_options(SimpleNamespace(generation_config=read_generation_settings(custom))) == [
        "repetition_penalty", "no_repeat_ngram_size", "suppress_tokens", "multi-token bad_words_ids",
        "forced_bos_token_id"]


def test_ctranslate2_on_a_cpu_worker_never_imports_torch(tiny_models: dict[str, str]) -> None:
    """A Ray actor given no GPU sees CUDA_VISIBLE_DEVICES="": loading and translating then stays
    without torch."""
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from filters.backtranslation import BackTranslationConfig, BackTranslator\n"
        f"t = BackTranslator(BackTranslationConfig(models={dict(tiny_models)!r}, max_new_tokens=8))\n"
        "t.setup()\n"
        "out = t.translate(['a dog runs on the grass'])\n"
        "print(json.dumps([t.engines, 'torch' in sys.modules, out.counters['model_inputs']]))\n")
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                           timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert found.returncode == 0, found.stderr[-2000:]
    engines, imported_torch, inputs = json.loads(found.stdout.strip().splitlines()[-1])
    assert engines == {d: "ctranslate2" for d in DIRECTIONS} and inputs == 4
    assert imported_torch is False
