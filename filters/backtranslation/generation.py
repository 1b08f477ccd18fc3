"""A MarianMT model's generation settings, read from its folder without importing torch.

`transformers.GenerationConfig` imports torch (through its configuration utilities), which the
CTranslate2 engine on CPU otherwise never needs: setting up the four models took 5.3 CPU-seconds and
774 MiB with it, 1.2 and 93 MiB without (`bench/fixed_costs.py`, tiny models). Only
the settings the engines check are read from `generation_config.json`, with `GenerationConfig`'s
defaults; a test compares them with `GenerationConfig` on the same folders.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# The settings the engines check, with GenerationConfig's default for each (transformers 5: None,
# which the checks below read as "off", as they do 1.0 and 0).
SETTINGS = dict.fromkeys(("repetition_penalty", "no_repeat_ngram_size", "suppress_tokens", "begin_suppress_tokens",
                          "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id"))


def read_generation_settings(folder: Path) -> Any:
    """The settings of `generation_config.json`. An older folder without one (every opus-mt model
    on the hub has it) goes through `GenerationConfig.from_model_config`, torch and all, as which of
    `config.json`'s keys it keeps depends on the transformers version."""
    path = folder / "generation_config.json"
    if not path.exists():
        from transformers import GenerationConfig, MarianConfig

        return GenerationConfig.from_model_config(MarianConfig.from_pretrained(folder))
    found = json.loads(path.read_text())
    return SimpleNamespace(**{name: found.get(name, default) for name, default in SETTINGS.items()})


def unsupported_generation_options(model: Any) -> list[str]:
    """Options in the model's generation config that the fast loop and CTranslate2 do not reproduce
    (empty: safe to use)."""
    gen = model.generation_config
    found = []
    if gen.repetition_penalty not in (None, 1.0):
        found.append("repetition_penalty")
    if gen.no_repeat_ngram_size:
        found.append("no_repeat_ngram_size")
    if gen.suppress_tokens or gen.begin_suppress_tokens:
        found.append("suppress_tokens")
    if any(len(ids) != 1 for ids in gen.bad_words_ids or []):
        found.append("multi-token bad_words_ids")
    if gen.forced_bos_token_id is not None:
        found.append("forced_bos_token_id")
    return found
