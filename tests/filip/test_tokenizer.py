"""SentencePiece BPE tokenizer: training, layout of ids and masks, alignment strings."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest

from filip.tokenizer import BOS_ID, EOS_ID, PAD_ID, FilipTokenizer, main, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, flickr_dir: Path) -> FilipTokenizer:
    with open(flickr_dir / "captions.csv", newline="") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)]
    path = train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tokenizer.model", 800)
    return FilipTokenizer.load(path)


def test_ids_layout_and_mask(tokenizer: FilipTokenizer) -> None:
    ids, mask = tokenizer(["A dog runs on the grass .", "", "word " * 200])
    assert ids.shape == mask.shape == (3, 77)
    assert tokenizer.vocab_size == 800
    n = int(mask[0].sum())
    assert ids[0, 0] == BOS_ID and ids[0, n - 1] == EOS_ID and (ids[0, n:] == PAD_ID).all()
    assert ids[1, :2].tolist() == [BOS_ID, EOS_ID] and mask[1].sum() == 2
    assert mask[2].all() and ids[2, -1] == EOS_ID  # truncated to the context, end kept


def test_token_strings_align_with_positions(tokenizer: FilipTokenizer) -> None:
    text = "A black dog jumps over a fence"
    pieces = tokenizer.token_strings(text)
    _, mask = tokenizer([text])
    assert len(pieces) == int(mask.sum())
    assert pieces[0] == "<start>" and pieces[-1] == "<end>"
    assert "dog" in pieces  # case-folded, whole common words


def test_pickles_for_dataloader_workers(tokenizer: FilipTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone(["a dog"])[0].tolist() == tokenizer(["a dog"])[0].tolist()


def test_cli_trains_beside_the_shards(flickr_shards: list[str], tmp_path: Path) -> None:
    out = tmp_path / "tok.model"
    assert main([str(Path(flickr_shards[0]).parent), "--vocab-size", "500", "--out", str(out)]) == 0
    assert FilipTokenizer.load(out).vocab_size == 500
