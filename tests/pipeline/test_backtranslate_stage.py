"""The back-translation stage on Ray: a caption is translated once per run, whichever actor meets it."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

from filters.backtranslation import BackTranslationConfig
from filters.caption import normalize_caption
from pipeline.ray_adapter import run_stage
from pipeline.stage import Resources
from pipeline.stages.backtranslate import BackTranslateStage, TranslationCache
from pipeline.storage import Storage

# Every shard repeats captions of the others (web captions repeat: "image", stock phrases ...).
SHARED = ["a dog runs on the beach", "Two children play football .", "a red car parked on a street"]


def _shards(storage: Storage, n_shards: int = 6, rows_per_shard: int = 10) -> tuple[list[str], list[str]]:
    names, captions = [], []
    for shard in range(n_shards):
        own = [f"shard {shard} photo number {i} of a small boat" for i in range(rows_per_shard - 4)]
        rows = own + SHARED + [SHARED[shard % len(SHARED)].upper()]  # case differs, same caption
        keys = [f"{shard:05d}{i:04d}" for i in range(len(rows))]
        name = f"{shard:05d}"
        storage.write_parquet(f"unsafe/{name}.parquet", pa.table({
            "key": keys, "caption": rows, "drop_reason": pa.nulls(len(rows), pa.string()),
            "drop_kind": pa.nulls(len(rows), pa.string())}))
        names.append(name)
        captions.extend(rows)
    return names, captions


def test_each_caption_is_translated_once_per_run_across_actors(tmp_path, ray_session, tiny_marian_models):
    storage = Storage(str(tmp_path / "out"))
    shards, captions = _shards(storage)
    config = BackTranslationConfig(models=tiny_marian_models, max_new_tokens=8, batch_size=16)
    # Two actors, small batches: shards are processed at the same time and captions meet in both.
    stage = BackTranslateStage(storage.url, "unsafe", config, Resources(num_cpus=1, concurrency=2, batch_size=4))
    stats = run_stage(stage, shards)
    counters = sum((Counter(s.counters) for s in stats), start=Counter())
    unique = {normalize_caption(c) for c in captions}
    assert counters["translated"] == len(unique)
    assert counters["cache_misses"] == len(unique)
    assert counters["cache_misses"] + counters["cache_hits"] == len(captions)
    assert counters["shared_cache_hits"] > 0 and not counters["shared_cache_timeouts"]
    # Rows with the same normalised caption got the same translation, whichever actor did it.
    table = pa.concat_tables([storage.read_parquet(f"backtranslate/{s}.parquet") for s in shards])
    seen: dict[str, tuple] = {}
    for row in table.to_pylist():
        pair = (row["caption_bt_de"], row["caption_bt_ru"])
        assert seen.setdefault(row["caption"], pair) == pair


def test_cache_keeps_pending_claims_and_evicts_oldest_finished() -> None:
    cache = TranslationCache(capacity=2)
    assert cache.claim(["a", "b"]) == ({}, ["a", "b"])
    assert cache.claim(["a"]) == ({}, [])          # claimed by someone else, not yet translated
    assert cache.lookup(["a"]) == {}
    cache.fulfil({"a": ("A-de", "A-ru")})
    assert cache.lookup(["a", "b"]) == {"a": ("A-de", "A-ru")}
    assert cache.claim(["c"]) == ({}, ["c"])        # over capacity: "a" (finished, oldest) goes
    cache.fulfil({})
    assert "a" not in cache.entries and set(cache.entries) == {"b", "c"}


def test_degenerate_back_translation_is_null_with_reason_column(tmp_path, tiny_marian_models) -> None:
    from tests.tiny_marian import build_tiny_marian

    # A de->en model whose greedy output is one word repeated: every German round trip degenerates.
    en_de = Path(tiny_marian_models["en_de"])
    vocab = json.loads((en_de / "vocab.json").read_text())
    word = next(p for p in vocab if p.startswith("▁") and p[1:].isalpha() and len(p) > 3)
    repeating = build_tiny_marian(tmp_path / "repeating", en_de.parent / "shared.spm", seed=7, repeat_piece=word)
    storage = Storage(str(tmp_path / "out"))
    shards, captions = _shards(storage, n_shards=1)
    config = BackTranslationConfig(models={**tiny_marian_models, "de_en": repeating}, max_new_tokens=16,
                                   device="cpu")
    stage = BackTranslateStage(storage.url, "unsafe", config, Resources(num_cpus=1, batch_size=4))
    stats = stage.run_shard(shards[0])
    stage.teardown()
    table = storage.read_parquet(f"backtranslate/{shards[0]}.parquet")
    assert table["caption_bt_de"].to_pylist() == [None] * len(captions)
    assert table["caption_bt_de_reason"].to_pylist() == ["degenerate"] * len(captions)
    ru, ru_reason = table["caption_bt_ru"].to_pylist(), table["caption_bt_ru_reason"].to_pylist()
    assert [r == "degenerate" for r in ru_reason] == [t is None for t in ru]
    assert set(ru_reason) <= {None, "degenerate"} and not set(ru) & set(captions)
    assert stats.rows_in == stats.rows_out == len(captions) and not stats.dropped
    assert stats.counters["degenerate_rows_de"] == len(captions)
    assert stats.counters["degenerate_rows_ru"] == ru.count(None)
    assert stats.counters["fallback_repetition"] >= stats.counters["translated"] > 0


def test_stage_with_ctranslate2_writes_what_transformers_writes(tmp_path, tiny_marian_models) -> None:
    tables = {}
    for engine in ("ctranslate2", "generate"):
        storage = Storage(str(tmp_path / engine))
        shards, captions = _shards(storage, n_shards=1)
        config = BackTranslationConfig(models=tiny_marian_models, max_new_tokens=12, device="cpu", engine=engine,
                                       compute_type="float32", max_ngram_repeats=0, max_length_ratio=1e6)
        stage = BackTranslateStage(storage.url, "unsafe", config, Resources(num_cpus=1, batch_size=4))
        stats = stage.run_shard(shards[0])
        assert stage.translator.engines == dict.fromkeys(tiny_marian_models, engine)
        stage.teardown()
        assert stats.rows_in == stats.rows_out == len(captions)
        tables[engine] = storage.read_parquet(f"backtranslate/{shards[0]}.parquet")
    ct2, plain = tables["ctranslate2"], tables["generate"]
    assert ct2.column_names == plain.column_names
    for column in ("caption_bt_de", "caption_bt_ru", "caption_bt_de_reason", "caption_bt_ru_reason"):
        assert ct2[column].to_pylist() == plain[column].to_pylist()
    assert len(set(ct2["caption_bt_de"].to_pylist())) > 3  # real, input-dependent outputs
