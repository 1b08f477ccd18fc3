"""Builds tiny MarianMT translation models (random weights, SentencePiece trained on the fly).

The folders look like the Helsinki-NLP opus-mt ones (config.json, generation_config.json, weights,
source.spm, target.spm, vocab.json), so they load through ``from_pretrained`` exactly as real models do.
The tests and `filip demo` use them where no model hub can be reached: their outputs are noise (most
fall back to the original caption), which exercises the stage's plumbing, not translation quality.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

DIRECTIONS = ("en_de", "de_en", "en_ru", "ru_en")


def train_sentencepiece(corpus: list[str], path: Path, vocab_size: int = 256) -> None:
    """Train a small unigram SentencePiece model on ``corpus`` and write it to ``path``."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    path.write_bytes(buffer.getvalue())


def marian_vocab(spm_path: Path) -> dict[str, int]:
    """Marian's layout: </s> = 0, <unk> = 1, the pieces, then <pad> last (it is also the decoder start)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


def build_tiny_marian(out_dir: Path, spm_path: Path, seed: int = 0, repeat_piece: str | None = None,
                      d_model: int = 32, layers: int = 2, init_std: float = 0.2) -> str:
    """Save one tiny MarianMTModel + MarianTokenizer under ``out_dir``; return the folder as a string.

    ``repeat_piece``: give that vocabulary piece a huge output bias, so greedy decoding repeats it
    until ``max_new_tokens`` (a real runaway-repetition model for the degenerate-output tests).
    """
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.build.json"
    vocab = marian_vocab(spm_path)
    vocab_path.write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(source_spm=str(spm_path), target_spm=str(spm_path), vocab=str(vocab_path))
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, max_position_embeddings=256,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0, init_std=init_std)
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    if repeat_piece is not None:
        with torch.no_grad():
            model.final_logits_bias[0, vocab[repeat_piece]] = 1e4
    # As in the opus-mt folders: beam search by default (the translator must ask for greedy itself),
    # the pad token banned, EOS forced at the last position.
    model.generation_config = GenerationConfig(
        bad_words_ids=[[pad]], decoder_start_token_id=pad, eos_token_id=0, pad_token_id=pad,
        forced_eos_token_id=0, max_length=256, num_beams=4)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    vocab_path.unlink()
    return str(out_dir)


def build_tiny_marian_models(out_dir: Path, corpus: list[str]) -> dict[str, str]:
    """Build the four tiny models (en_de, de_en, en_ru, ru_en) under ``out_dir``; return their folders.

    One SentencePiece model serves every "language": the tests check plumbing, not translation.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm_path = out_dir / "shared.spm"
    train_sentencepiece(corpus, spm_path)
    return {d: build_tiny_marian(out_dir / d, spm_path, seed=i) for i, d in enumerate(DIRECTIONS)}
