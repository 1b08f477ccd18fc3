"""The caption-language stage on a hand-written shard, without Ray: exact columns, decisions, counters."""
from __future__ import annotations

import pyarrow as pa
import pytest

from filters.language import CaptionLanguageConfig
from pipeline.stage import Resources
from pipeline.stages.language import CaptionLanguageStage
from pipeline.storage import Storage

CAPTIONS = [
    ("a brown horse standing in a green field", "en"),
    ("ein braunes Pferd steht auf einer grünen Wiese", "de"),
    ("коричневая лошадь стоит на зелёном поле", "ru"),
    ("一匹棕色的马站在绿色的草地上", "zh"),
    ("un cheval brun dans un pré vert", "fr"),
    ("un caballo marrón en un prado verde", "es"),
    ("three friends laughing at a picnic", "en"),
    ("drei Freunde lachen bei einem Picknick", "de"),
    ("трое друзей смеются на пикнике", "ru"),
    ("三个朋友在野餐时大笑", "zh"),
    (None, "und"),
    ("sunset over the lake https://example.com/p/1234", "en"),
]


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Storage:
    """An input-stage shard as the input stage writes it: row_id, url, caption, no drop_reason."""
    storage = Storage(str(tmp_path_factory.mktemp("language") / "out"))
    storage.write_parquet("input/00000.parquet", pa.table({
        "row_id": pa.array(range(len(CAPTIONS)), pa.int64()),
        "url": [f"http://127.0.0.1/{i}.jpg" for i in range(len(CAPTIONS))],
        "caption": pa.array([caption for caption, _ in CAPTIONS], pa.string())}))
    return storage


def run(storage: Storage, config: CaptionLanguageConfig, input_stage: str = "input") -> tuple[pa.Table, object]:
    stage = CaptionLanguageStage(storage.url, input_stage, config, Resources(batch_size=5))  # three batches
    stats = stage.run_shard("00000")
    stage.teardown()
    return storage.read_parquet("caption_language/00000.parquet"), stats


def test_default_keeps_english_only(output: Storage) -> None:
    table, stats = run(output, CaptionLanguageConfig())
    assert table.column_names == ["row_id", "url", "caption", "caption_lang", "caption_lang_confidence",
                                  "drop_reason", "drop_kind"]
    assert table.schema.field("caption_lang_confidence").type == pa.float32()
    assert table["row_id"].to_pylist() == list(range(len(CAPTIONS)))
    assert table["caption_lang"].to_pylist() == [language for _, language in CAPTIONS]
    kept = [language == "en" for _, language in CAPTIONS]
    assert table["drop_reason"].to_pylist() == [None if keep else "caption_language" for keep in kept]
    assert table["drop_kind"].to_pylist() == [None if keep else "dropped" for keep in kept]
    confidences = table["caption_lang_confidence"].to_pylist()
    assert confidences[10] == 0.0 and all(0 < c <= 1 for i, c in enumerate(confidences) if i != 10)
    assert (stats.stage, stats.rows_in, stats.rows_out) == ("caption_language", 12, 3)
    assert dict(stats.dropped) == {"caption_language": 9} and not stats.failed
    assert dict(stats.counters) == {"caption_lang_en": 3, "caption_lang_de": 2, "caption_lang_ru": 2,
                                    "caption_lang_zh": 2, "caption_lang_fr": 1, "caption_lang_es": 1,
                                    "caption_lang_und": 1}


def test_configured_languages_and_rows_dropped_before(output: Storage) -> None:
    # A previous stage dropped rows 0-3: only the rows it kept reach this stage.
    previous = output.read_parquet("input/00000.parquet")
    reasons = ["too_small"] * 4 + [None] * (len(CAPTIONS) - 4)
    kinds = [reason and "dropped" for reason in reasons]
    output.write_parquet("inspect/00000.parquet", previous
                         .append_column("drop_reason", pa.array(reasons, pa.string()))
                         .append_column("drop_kind", pa.array(kinds, pa.string())))
    table, stats = run(output, CaptionLanguageConfig(keep=["ru", "zh", "und"]), input_stage="inspect")
    assert table["row_id"].to_pylist() == list(range(4, len(CAPTIONS)))
    assert table["caption_lang"].to_pylist() == ["fr", "es", "en", "de", "ru", "zh", "und", "en"]
    assert table["drop_reason"].to_pylist() == ["caption_language"] * 4 + [None, None, None, "caption_language"]
    assert (stats.rows_in, stats.rows_out, dict(stats.dropped)) == (8, 3, {"caption_language": 5})
