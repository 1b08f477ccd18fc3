"""Which engine translates, and loading one model for it: transformers (fast greedy loop or generate)
or CTranslate2 (converted once, see ``ct2_engine.py``)."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from .config import AUTO_COMPUTE_TYPE, AUTO_ENGINE, BackTranslationConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadedDirection:
    """One translation direction: its tokenizer and exactly one engine's model."""

    tokenizer: Any
    engine: str  # fast | generate | ctranslate2
    model: Any = None  # MarianMTModel (fast, generate)
    fast: Any = None  # FastGreedyDecoder (fast)
    ct2: Any = None  # Ct2Direction (ctranslate2)
    converted: bool = False  # this load converted the model to CTranslate2 (not found in the cache)


def resolve_engine(config: BackTranslationConfig, device: str) -> str:
    """ctranslate2, fast or generate: ``auto`` is the measured choice for ``device``."""
    engine = AUTO_ENGINE[device] if config.engine == "auto" else config.engine
    if engine == "transformers":
        return "fast" if config.num_beams == 1 else "generate"
    if engine == "fast" and config.num_beams > 1:
        return "generate"  # the fast loop is greedy only
    return engine


def resolve_compute_type(config: BackTranslationConfig, device: str, dtype_name: str) -> str:
    """CTranslate2's compute type: the setting, else the measured CPU choice, else the dtype on a GPU."""
    if config.compute_type != "auto":
        return config.compute_type
    return AUTO_COMPUTE_TYPE.get(device, dtype_name)


def _load_ct2(name: str, tokenizer: Any, config: BackTranslationConfig, device: str, compute_type: str,
              threads: int) -> LoadedDirection | None:
    """The CTranslate2 direction, or None when the model needs options it cannot honour and auto chose it."""
    from .ct2_engine import Ct2Direction, converted_model, model_folder, unsupported_options
    from .generation import read_generation_settings

    try:
        import ctranslate2  # noqa: F401 - a project dependency, but a hand-made environment may lack it
    except ImportError:
        problems = ["the ctranslate2 package is not installed (pip install ctranslate2)"]
    else:
        folder = model_folder(name)
        generation = read_generation_settings(folder)
        problems = unsupported_options(generation, tokenizer)
    if problems:
        if config.engine == "ctranslate2":
            raise ValueError(f"backtranslation.engine=ctranslate2 cannot honour {problems} of {name!r}")
        logger.warning("%s: %s; translating with transformers instead of CTranslate2", name, problems)
        return None
    path, converted = converted_model(name, compute_type, config.ct2_cache_dir)
    ct2 = Ct2Direction(path, tokenizer, generation, device, compute_type, threads)
    return LoadedDirection(tokenizer, "ctranslate2", ct2=ct2, converted=converted)


def intra_op_threads() -> int:
    """The threads torch would use, without importing it: OMP_NUM_THREADS (Ray sets it to an
    actor's CPUs), else torch's own count if it is loaded already, else the machine's cores."""
    found = os.environ.get("OMP_NUM_THREADS", "")
    if found.isdigit() and int(found) > 0:
        return int(found)
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return os.cpu_count() or 1


def load_direction(name: str, config: BackTranslationConfig, device: str, dtype_name: str) -> LoadedDirection:
    """Load model ``name`` (local folder or cached hub id) for the engine the config asks on ``device``."""
    from transformers import MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(name, local_files_only=True)
    engine = resolve_engine(config, device)
    if engine == "ctranslate2":
        loaded = _load_ct2(name, tokenizer, config, device, resolve_compute_type(config, device, dtype_name),
                           intra_op_threads())
        if loaded is not None:
            return loaded
        engine = "fast" if config.num_beams == 1 else "generate"
    import torch  # the transformers engines only
    from transformers import MarianMTModel

    from .fast_greedy import FastGreedyDecoder
    from .generation import unsupported_generation_options

    model = MarianMTModel.from_pretrained(name, local_files_only=True, dtype=getattr(torch, dtype_name))
    model = model.to(device).eval()
    if engine == "fast":
        problems = unsupported_generation_options(model)
        if problems and config.engine == "fast":
            raise ValueError(f"backtranslation.engine=fast cannot honour {problems} of {name!r}")
        if not problems:
            fast = FastGreedyDecoder(model, cuda_graphs=config.cuda_graphs, attention=config.fast_attention)
            return LoadedDirection(tokenizer, "fast", model=model, fast=fast)
    return LoadedDirection(tokenizer, "generate", model=model)
