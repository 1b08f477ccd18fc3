"""CTranslate2 as the MarianMT engine: each model converted once, cached, shared by concurrent actors.

Where a conversion lives: beside a local model folder that is writable (``<model>/ct2-<quant>-<key>/``),
otherwise (a hub id, whose snapshot lies in the Hugging Face cache, or a read-only folder) under the
cache folder (``backtranslation.ct2_cache_dir``, default ``~/.cache/filip/ct2``), in a subfolder named
after the model. ``<key>`` hashes the size and mtime of the model's files, the quantization and the
ctranslate2 version, so a changed model gets a new conversion, which then replaces the earlier ones.
Concurrent actors each convert into a temporary folder and rename it into place: the first rename
wins, the others drop theirs and load the winner's.
Tokenization stays with MarianTokenizer, so the engines see the same token ids.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .config import is_local_path

logger = logging.getLogger(__name__)

# The files whose change means a changed model (weights, vocabulary, configuration).
_KEY_FILES = ("config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
              "vocab.json", "source.spm", "target.spm")


def model_folder(name: str) -> Path:
    """The folder holding the model's files: ``name`` itself, or the cached hub snapshot of a hub id."""
    if is_local_path(name):
        return Path(name).expanduser().resolve()
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    if not isinstance(config, str):
        raise FileNotFoundError(f"hub model {name!r} is not in the local Hugging Face cache")
    return Path(config).parent


def conversion_key(folder: Path, quantization: str) -> str:
    """12 hex digits that change when the model's files, the quantization or ctranslate2's version do."""
    import ctranslate2

    files = []
    for name in _KEY_FILES:
        path = folder / name
        if path.is_file():
            stat = path.stat()  # follows the hub cache's symlinks to the blobs
            files.append([name, stat.st_size, stat.st_mtime_ns])
    text = json.dumps([ctranslate2.__version__, quantization, files])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def conversion_parent(name: str, folder: Path, cache_dir: str) -> Path:
    """Beside a writable local model folder, otherwise a subfolder of the cache folder named after the model."""
    if is_local_path(name) and os.access(folder, os.W_OK):
        return folder
    root = Path(cache_dir).expanduser() if cache_dir else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "filip" / "ct2"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/.~"))[-80:]
    # A hub id keeps its subfolder across revisions (the old conversion is then removed as stale).
    identity = str(folder) if is_local_path(name) else name
    return root / f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _convert(folder: Path, output: Path, quantization: str) -> None:
    """Convert with ctranslate2's converter, loading model and tokenizer as the translator does."""
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianMTModel, MarianTokenizer

    class _MarianConverter(TransformersConverter):
        # The converter's own loaders may reach the hub; ours read local files only, in float32.
        def load_model(self, model_class: Any, path: str, **kwargs: Any) -> Any:
            return MarianMTModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)

        def load_tokenizer(self, tokenizer_class: Any, path: str, **kwargs: Any) -> Any:
            return MarianTokenizer.from_pretrained(path, local_files_only=True)

    _MarianConverter(str(folder)).convert(str(output), quantization=quantization, force=True)


def converted_model(name: str, quantization: str, cache_dir: str = "") -> tuple[Path, bool]:
    """The CTranslate2 folder of model ``name`` (converted now if absent) and whether this call converted it."""
    folder = model_folder(name)
    parent = conversion_parent(name, folder, cache_dir)
    final = parent / f"ct2-{quantization}-{conversion_key(folder, quantization)}"
    if (final / "model.bin").is_file():
        return final, False
    parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        _convert(folder, temporary, quantization)
        os.rename(temporary, final)  # atomic; fails when another actor renamed its copy first
    except OSError:
        if not (final / "model.bin").is_file():
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        return final, False
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for stale in parent.glob(f"ct2-{quantization}-*"):  # conversions of an earlier version of the model
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("converted %s to CTranslate2 (%s) in %s", name, quantization, final)
    return final, True


def unsupported_options(generation: Any, tokenizer: Any) -> list[str]:
    """Options of the model that the CTranslate2 path does not reproduce (empty: safe to use)."""
    from .generation import unsupported_generation_options

    problems = unsupported_generation_options(SimpleNamespace(generation_config=generation))
    if tokenizer.separate_vocabs:  # the converter writes one vocabulary for both sides
        problems.append("separate source and target vocabularies")
    return problems


class Ct2Direction:
    """One converted MarianMT model: MarianTokenizer's token ids in, decoded strings out."""

    def __init__(self, path: Path, tokenizer: Any, generation: Any, device: str, compute_type: str,
                 threads: int) -> None:
        import ctranslate2

        self.tokenizer = tokenizer
        self.translator = ctranslate2.Translator(str(path), device=device, compute_type=compute_type,
                                                 inter_threads=1, intra_threads=threads)
        # generate forces EOS as the last of max_new_tokens tokens, leaving max_new_tokens - 1 words.
        self.forced_eos = generation.forced_eos_token_id is not None
        # The pad token is not in the converted vocabulary (the decoder starts from a zero embedding
        # instead), so it is never emitted, as the opus-mt bad_words_ids=[[pad]] ask; other banned
        # single tokens are suppressed.
        pad = tokenizer.pad_token_id
        banned = [ids[0] for ids in generation.bad_words_ids or [] if ids[0] != pad]
        self.suppress = [[token] for token in tokenizer.convert_ids_to_tokens(banned)] or None

    def translate_tokens(self, tokens: list[list[str]], beams: int, max_new_tokens: int, batch_size: int,
                         min_new_tokens: int = 0) -> list[list[str]]:
        """The best hypothesis per source (source tokens end in EOS), with generate's length limits."""
        limit = max_new_tokens - 1 if self.forced_eos else max_new_tokens
        if not tokens or limit < 1:  # generate's single forced EOS decodes to ""
            return [[] for _ in tokens]
        results = self.translator.translate_batch(  # sorts by length and batches by itself
            tokens, max_batch_size=batch_size, beam_size=beams, max_decoding_length=limit,
            min_decoding_length=min(min_new_tokens, limit), max_input_length=0,
            suppress_sequences=self.suppress)
        return [result.hypotheses[0] for result in results]

    def translate(self, ids: list[list[int]], beams: int, max_new_tokens: int, batch_size: int) -> list[str]:
        """Decoded translations of the (already truncated) token ids, in input order."""
        tok = self.tokenizer
        out = self.translate_tokens([tok.convert_ids_to_tokens(seq) for seq in ids], beams, max_new_tokens,
                                    batch_size)
        return tok.batch_decode([tok.convert_tokens_to_ids(tokens) for tokens in out], skip_special_tokens=True)
