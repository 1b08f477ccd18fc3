"""Hostile YAML for the config tests: shared by the pipeline's, the trainer's and the CLI's."""
from __future__ import annotations


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A flow list of `width ** levels` strings (~387 million) in a few hundred bytes: anchors and
    aliases within one value, so it fits wherever a value goes."""
    text = "&a0 [" + ", ".join(["lol"] * width) + "]"
    for level in range(1, levels):
        text = f"&a{level} [{text}, " + ", ".join([f"*a{level - 1}"] * (width - 1)) + "]"
    return text
