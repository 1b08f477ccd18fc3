"""SentencePiece BPE tokenizer trained on the corpus captions, stored beside the shards.

Layout of one encoded caption: [start, pieces..., end, pad, pad, ...], `context_length` ids in all
(the model config's `context_length`, 77 by default); pieces beyond `context_length - 2` are cut.
The model is kept as serialized bytes so it pickles into dataloader workers and embeds into
checkpoints.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from pipeline.schema import BACK_TRANSLATION_COLUMNS

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DEFAULT_NAME = "tokenizer.model"
logger = logging.getLogger(__name__)


class FilipTokenizer:
    """Turns captions into fixed-length id tensors and a validity mask."""

    def __init__(self, model_proto: bytes, context_length: int = 77) -> None:
        import sentencepiece as spm

        if context_length < 3:
            raise ValueError("context_length must leave room for start, one piece and end")
        self.model_proto = bytes(model_proto)
        self.context_length = context_length
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    @classmethod
    def load(cls, path: str | os.PathLike[str], context_length: int = 77) -> "FilipTokenizer":
        """From a local path or a URL fsspec opens (the tokenizer beside shards in a bucket)."""
        if "://" not in str(path):
            return cls(Path(path).read_bytes(), context_length)
        import fsspec

        with fsspec.open(str(path), "rb") as handle:
            return cls(handle.read(), context_length)

    def with_context_length(self, context_length: int) -> "FilipTokenizer":
        """The same pieces, encoded to `context_length` ids (a model's `context_length`)."""
        return FilipTokenizer(self.model_proto, context_length)

    def __getstate__(self) -> dict[str, object]:
        # The C++ processor does not pickle; rebuild it from the bytes in the worker.
        return {"model_proto": self.model_proto, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["model_proto"], state["context_length"])  # type: ignore[misc, arg-type]

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def _pieces(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))[: self.context_length - 2]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [BOS_ID, *self._pieces(text), EOS_ID]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != PAD_ID

    def token_strings(self, text: str) -> list[str]:
        """Readable piece for each valid id position (index k is position k of `__call__`)."""
        pieces = [self._sp.id_to_piece(i) for i in self._pieces(text)]
        return ["<start>", *[p.replace("\u2581", "") or "\u2581" for p in pieces], "<end>"]


def train_tokenizer(captions: Iterable[str], out_path: Path, vocab_size: int) -> Path:
    """Train a SentencePiece BPE model on `captions` and write it atomically to `out_path`."""
    import sentencepiece as spm

    out_path = Path(out_path)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(c for c in captions if c and c.strip()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        # A small corpus may not support the requested size: take what it supports.
        hard_vocab_limit=False,
        character_coverage=1.0,
        # Case-folded NFKC, as CLIP lower-cases its captions.
        normalization_rule_name="nmt_nfkc_cf",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=max(1, min(8, os.cpu_count() or 1)),
        minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out_path)
    return out_path


def iter_shard_captions(shard_paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Every `.txt` caption (and back-translations in `.json`) found in WebDataset tar shards."""
    import json

    for path in shard_paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8", "replace")  # type: ignore[union-attr]
                elif member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    for key in BACK_TRANSLATION_COLUMNS:
                        if isinstance(meta.get(key), str):
                            yield meta[key]


def main(argv: list[str] | None = None) -> int:
    """`python -m filip.tokenizer SHARDS_DIR`: train tokenizer.model beside the shards."""
    parser = argparse.ArgumentParser(description="Train the SentencePiece BPE caption tokenizer")
    parser.add_argument("shards_dir", type=Path, help="folder with NNNNN.tar WebDataset shards")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=None, help=f"default: SHARDS_DIR/{DEFAULT_NAME}")
    args = parser.parse_args(argv)
    shards = sorted(args.shards_dir.glob("*.tar"))
    if not shards:
        parser.error(f"no .tar shards in {args.shards_dir}")
    out = train_tokenizer(iter_shard_captions(shards), args.out or args.shards_dir / DEFAULT_NAME,
                          args.vocab_size)
    logging.basicConfig(level=logging.INFO)
    logger.info("wrote %s (vocab %d)", out, FilipTokenizer.load(out).vocab_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
