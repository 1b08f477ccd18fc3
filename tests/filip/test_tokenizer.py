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


def test_with_context_length_cuts_and_pads_to_the_model_context(tokenizer: FilipTokenizer) -> None:
    short = tokenizer.with_context_length(32)
    assert (short.context_length, tokenizer.context_length) == (32, 77)
    texts = ["A dog runs on the grass .", "word " * 200]
    ids, mask = short(texts)
    full, _ = tokenizer(texts)
    assert ids.shape == mask.shape == (2, 32)
    n = int(mask[0].sum())
    assert ids[0].tolist() == full[0, :32].tolist() and ids[0, n - 1] == EOS_ID
    assert mask[1].all() and ids[1, :31].tolist() == full[1, :31].tolist() and ids[1, -1] == EOS_ID
    assert len(short.token_strings("word " * 200)) == 32
    assert pickle.loads(pickle.dumps(short))(texts)[0].tolist() == ids.tolist()
    with pytest.raises(ValueError, match="context_length must leave room"):
        tokenizer.with_context_length(2)


def test_cli_trains_beside_the_shards(flickr_shards: list[str], tmp_path: Path) -> None:
    out = tmp_path / "tok.model"
    assert main([str(Path(flickr_shards[0]).parent), "--vocab-size", "500", "--out", str(out)]) == 0
    assert FilipTokenizer.load(out).vocab_size == 500
