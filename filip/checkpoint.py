"""Step-level checkpoints: atomic writes, `latest` lookup, and loading a model for inference.

A checkpoint is one `torch.save` of plain containers and tensors only (the tokenizer travels as a
uint8 tensor), so every load uses `weights_only=True`.
"""
from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from filip.model import FilipModel, ModelConfig
from filip.tokenizer import FilipTokenizer

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (and torch.compile) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def save_checkpoint(path: str | os.PathLike[str], *, model: nn.Module, model_config: ModelConfig,
                    tokenizer: FilipTokenizer, loss_kind: str, step: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    scaler: Any = None, data_state: dict[str, Any] | None = None,
                    train_config: dict[str, Any] | None = None,
                    rng_state: dict[str, Any] | None = None) -> Path:
    """Write everything needed to resume training (or to run inference) to `path` atomically."""
    path = Path(path)
    state = {
        "format": 1,
        "step": int(step),
        "loss_kind": loss_kind,
        "model_config": model_config.to_dict(),
        "model": unwrap(model).state_dict(),
        "tokenizer_proto": torch.frombuffer(bytearray(tokenizer.model_proto), dtype=torch.uint8),
        "context_length": tokenizer.context_length,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state if rng_state is not None else capture_rng_state(),
        "data_state": data_state or {},
        "train_config": train_config or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic: a kill leaves the old file or the new one, never half.
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Checkpoints in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class InferenceBundle:
    """A trained model ready for evaluation, with its tokenizer and image preprocessing."""

    model: FilipModel
    tokenizer: FilipTokenizer
    loss_kind: str
    image_transform: Callable[[Any], torch.Tensor]
    step: int = 0


def load_for_inference(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> InferenceBundle:
    """Load a checkpoint's model (eval mode, on `device`), tokenizer and eval transform."""
    from filip.data import eval_transform

    state = load_checkpoint(path, map_location="cpu")
    cfg = ModelConfig(**state["model_config"])
    cfg.grad_checkpointing = False
    model = FilipModel(cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    tokenizer = FilipTokenizer(state["tokenizer_proto"].numpy().tobytes(), state["context_length"])
    return InferenceBundle(model=model, tokenizer=tokenizer, loss_kind=state["loss_kind"],
                           image_transform=eval_transform(cfg.image_size), step=state["step"])
