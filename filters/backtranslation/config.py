"""Configuration of the back-translation stage and the check that its four models are present."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.configtools import FieldError, ranged, short_repr

DIRECTIONS: tuple[str, ...] = ("en_de", "de_en", "en_ru", "ru_en")
# Files that MarianMTModel/MarianTokenizer.from_pretrained need; the weights may come in either format.
_REQUIRED_FILES: tuple[str, ...] = ("config.json", "source.spm", "target.spm", "vocab.json")
_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


# What engine="auto" and compute_type="auto" mean per device, chosen by bench/backtranslate.py
# (docs/BENCHMARKS.md): on 2 CPU threads CTranslate2 translated faster than both transformers engines.
# The GPU keeps the fast greedy loop with CUDA graphs until CTranslate2 is measured on a GPU.
AUTO_ENGINE: dict[str, str] = {"cpu": "ctranslate2", "cuda": "transformers"}
AUTO_COMPUTE_TYPE: dict[str, str] = {"cpu": "float32"}


class MissingModelError(FileNotFoundError):
    """A configured back-translation model is neither a local folder nor in the local HF cache."""


def _default_models() -> dict[str, str]:
    return {d: f"Helsinki-NLP/opus-mt-{d.replace('_', '-')}" for d in DIRECTIONS}


@dataclass
class BackTranslationConfig:
    """Settings of caption back-translation (EN->DE->EN and EN->RU->EN) with MarianMT.

    ``models`` maps each direction (en_de, de_en, en_ru, ru_en) to a hub id or a local folder.
    Degenerate outputs (see ``degenerate.py``) fall back to the original caption.
    """

    enabled: bool = True
    models: dict[str, str] = field(default_factory=_default_models)
    batch_size: int = ranged(256, "[1, inf)")
    max_input_tokens: int = ranged(128, "[2, inf)")  # longer inputs are truncated (and counted)
    num_beams: int = ranged(1, "[1, inf)")  # greedy by default; >1: beam search (generate or ctranslate2)
    max_new_tokens: int = ranged(128, "[1, inf)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on cuda, float32 on cpu
    # transformers: the fast greedy loop when num_beams == 1, else generate; ctranslate2: the model
    # converted once to CTranslate2 (ct2_engine.py). auto: by measurement per device (AUTO_ENGINE).
    engine: Literal["auto", "transformers", "fast", "generate", "ctranslate2"] = "auto"
    # ctranslate2 only. auto: the measured choice on CPU (AUTO_COMPUTE_TYPE), the dtype on a GPU.
    compute_type: Literal["auto", "float32", "int8", "int8_float32", "int16", "float16", "bfloat16",
                          "int8_float16", "int8_bfloat16"] = "auto"
    ct2_cache_dir: str = ""  # conversions of hub models and read-only folders; "": ~/.cache/filip/ct2
    cuda_graphs: bool = True  # replay each decode step as a CUDA graph (GPU, fast engine only)
    # sdpa: same tokens as generate (checked on an H100); matmul: ~15% faster on an H100, but in
    # float16 about 1% of sequences differ from generate's by rounding (docs/BENCHMARKS.md).
    fast_attention: Literal["sdpa", "matmul"] = "sdpa"
    # output words > ratio * source words + length_slack -> too_long
    max_length_ratio: float = ranged(3.0, "[0, inf)")
    length_slack: int = ranged(4, "[0, inf)")
    # an n-gram (n <= 4) repeated this many times in a row -> repetition; 0 or 1 turns the check off
    max_ngram_repeats: int = ranged(4, "[0, inf)")
    cache_size: int = ranged(1_000_000, "[0, inf)")  # normalised captions remembered per translator (LRU)

    def __post_init__(self) -> None:
        unknown = set(self.models) - set(DIRECTIONS)
        missing = set(DIRECTIONS) - set(self.models)
        if unknown or missing:
            raise FieldError("models", f"must name exactly {list(DIRECTIONS)}; unknown: "
                                       f"{short_repr(sorted(unknown))}, missing: {sorted(missing)}")


def is_local_path(name: str) -> bool:
    """True when ``name`` is meant as a folder rather than a hub id ("org/name" has one slash)."""
    return (Path(name).expanduser().exists() or name.startswith(("/", ".", "~"))
            or name.count("/") != 1)


def _missing_in_cache(repo_id: str) -> list[str]:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)

    missing = [f for f in _REQUIRED_FILES if not cached(f)]
    if not any(cached(f) for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    return missing


def check_models(config: BackTranslationConfig) -> None:
    """Raise MissingModelError naming the config key and the path or id of every absent model.

    Run-time hub downloads are impossible on the workers, so a hub id counts as present only when
    its files are in the local Hugging Face cache (the same lookup ``local_files_only=True`` does).
    """
    if not config.enabled:
        return
    problems: list[str] = []
    for direction in DIRECTIONS:
        name = config.models[direction]
        key = f"backtranslation.models.{direction}"
        if is_local_path(name):
            folder = Path(name).expanduser()
            if not folder.is_dir():
                problems.append(f"{key}: local model folder {name!r} does not exist")
                continue
            absent = [f for f in _REQUIRED_FILES if not (folder / f).is_file()]
            if not any((folder / f).is_file() for f in _WEIGHT_FILES):
                absent.append(" or ".join(_WEIGHT_FILES))
            if absent:
                problems.append(f"{key}: local model folder {name!r} lacks {', '.join(absent)}")
        else:
            absent = _missing_in_cache(name)
            if absent:
                cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
                problems.append(f"{key}: hub model {name!r} is not in the local Hugging Face cache "
                                f"({cache}; missing {', '.join(absent)}); downloads are impossible at run "
                                f"time: pre-fetch it (`hf download {name}`) or give a local folder")
    if problems:
        raise MissingModelError("back-translation models missing: " + "; ".join(problems))
