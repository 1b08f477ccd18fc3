"""The Parquet twins of the final shards (`shards_parquet/`) read as one table by Hugging Face
`datasets`, pyarrow and pandas, each given the folder: every kept sample, with its captions."""
from __future__ import annotations

import json
from pathlib import Path

CAPTION_COLUMNS = ("caption", "caption_bt_de", "caption_bt_ru")


def kept_captions(out: Path) -> dict[str, str]:
    """{key: caption} of every sample of the WebDataset shards (its `.txt` member)."""
    from filip.shard_reader import iter_shard_samples

    return {sample["__key__"]: sample["txt"].decode() for shard in sorted((out / "shards").glob("*.tar"))
            for _, _, _, sample in iter_shard_samples(str(shard))}


def test_datasets_loads_every_sample_with_its_captions(interop_corpus: Path, tmp_path: Path) -> None:
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(interop_corpus / "shards_parquet"),
                                   split="train", cache_dir=str(tmp_path / "cache"))
    assert set(CAPTION_COLUMNS) <= set(loaded.column_names)
    kept = kept_captions(interop_corpus)
    sizes = json.loads((interop_corpus / "shards" / "sizes.json").read_text())
    assert loaded.num_rows == len(kept) == sum(sizes.values()) > 0
    assert dict(zip(loaded["key"], loaded["caption"])) == kept
    # The back-translation columns are there for every row: a string, or null when degenerate.
    for column in ("caption_bt_de", "caption_bt_ru"):
        assert all(value is None or isinstance(value, str) for value in loaded[column])


def test_pyarrow_and_pandas_read_the_folder(interop_corpus: Path) -> None:
    import pandas
    import pyarrow.dataset

    folder = interop_corpus / "shards_parquet"
    kept = kept_captions(interop_corpus)
    table = pyarrow.dataset.dataset(folder, format="parquet").to_table()
    assert dict(zip(table["key"].to_pylist(), table["caption"].to_pylist())) == kept
    frame = pandas.read_parquet(folder)
    assert dict(zip(frame["key"], frame["caption"])) == kept
    assert set(CAPTION_COLUMNS) <= set(frame.columns)
