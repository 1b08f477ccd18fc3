"""Step-level checkpoints: atomic writes, `latest` lookup, and loading a model for inference.

A checkpoint is one `torch.save` of plain containers and tensors only (the tokenizer travels as a
uint8 tensor), so every load uses `weights_only=True`. A checkpoint is untrusted input: its
structure, its `model_config` and the shapes of its tensors are checked before a model is built,
and anything wrong is a one-line `CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from filip.model import FilipModel, ModelConfig
from filip.tokenizer import FilipTokenizer
from pipeline.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
# Keys every checkpoint has (inference), and those a resumed run needs on top.
INFERENCE_KEYS = ("format", "step", "loss_kind", "model_config", "model", "tokenizer_proto",
                  "context_length")
TRAINING_KEYS = INFERENCE_KEYS + ("optimizer", "scheduler", "rng", "data_state")
# Generous bounds on a checkpoint's model_config, checked before anything is allocated. The
# paper's largest model (ViT-L/14) has 0.41e9 parameters; the cap is 8 GB of float32.
MAX_PARAMETERS = 2_000_000_000
MAX_PATCHES = 65_536  # image tokens per image: attention memory grows with their square
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 16_384), "image_size": (1, 8_192), "patch_size": (1, 8_192),
    "vision_width": (1, 16_384), "vision_layers": (1, 256), "vision_heads": (1, 1_024),
    "vocab_size": (4, 4_000_000), "context_length": (3, 16_384),
    "text_width": (1, 16_384), "text_layers": (1, 256), "text_heads": (1, 1_024),
}
MAX_MLP_RATIO = 64.0
# Fields that fix the model's tensors; the others (checkpointing, init) may differ on resume.
ARCHITECTURE_FIELDS = (*SIZE_LIMITS, "mlp_ratio")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, not a checkpoint, or not the expected model."""


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


def _read_error(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in a few words (its own messages run to many lines)."""
    import pickle

    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a checkpoint file"
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or error})"
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError):
        # Also what weights_only answers for a pickle of arbitrary objects: it is refused unread.
        return "not a checkpoint (not a PyTorch file of tensors and plain containers)"
    first_line = " ".join((str(error).splitlines() or [""])[0].split())[:150]
    if "zip archive" in first_line or "PytorchStreamReader" in first_line:
        return "truncated or corrupt (its zip archive cannot be read)"
    return f"not a checkpoint ({type(error).__name__}: {first_line})"


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *,
                    required: tuple[str, ...] = INFERENCE_KEYS) -> dict[str, Any]:
    """The checkpoint's top-level mapping, after checking it is one `filip train` wrote."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # garbage gives UnpicklingError, KeyError, EOFError, RuntimeError...
        raise CheckpointError(f"checkpoint {path}: {_read_error(path, error)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: not a `filip train` checkpoint "
                              f"(it holds a {type(state).__name__}, not a mapping)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a `filip train` checkpoint "
                              f"(no {', '.join(missing)})")
    expected: dict[str, tuple[type, ...]] = {
        "format": (int,), "step": (int,), "loss_kind": (str,), "model_config": (dict,),
        "model": (dict,), "tokenizer_proto": (torch.Tensor,), "context_length": (int,),
        "optimizer": (dict,), "scheduler": (dict,), "rng": (dict,), "data_state": (dict,)}
    for key in required:
        if not isinstance(state[key], expected[key]) or isinstance(state[key], bool):
            raise CheckpointError(f"checkpoint {path}: {key} is a {type(state[key]).__name__}, "
                                  f"expected {expected[key][0].__name__}")
    if state["format"] != 1 or state["step"] < 0 or state["loss_kind"] not in ("filip", "clip"):
        raise CheckpointError(f"checkpoint {path}: format {state['format']}, step {state['step']}, "
                              f"loss_kind {str(state['loss_kind'])[:40]!r}: expected format 1, "
                              f"a step >= 0 and loss_kind 'filip' or 'clip'")
    return state


def estimate_parameters(cfg: ModelConfig) -> int:
    """FilipModel's parameter count from the config alone (exact for timm's ViT and our text tower)."""
    def block(width: int) -> int:  # two norms, qkv + output projection, MLP, all with biases
        hidden = int(width * cfg.mlp_ratio)
        return 4 * width + 4 * width * width + 4 * width + 2 * width * hidden + hidden + width

    patches = (cfg.image_size // cfg.patch_size) ** 2
    # Patch embedding (no bias with pre-norm), class token, positions, pre- and final norm.
    vision = (3 * cfg.patch_size ** 2 + 1 + patches + 1 + 4) * cfg.vision_width
    vision += cfg.vision_layers * block(cfg.vision_width)
    text = (cfg.vocab_size + cfg.context_length + 2) * cfg.text_width
    text += cfg.text_layers * block(cfg.text_width)
    return vision + text + (cfg.vision_width + cfg.text_width) * cfg.embed_dim + 1


def model_config_from_dict(raw: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from untrusted values: known fields, right types, sizes within bounds."""
    where = f"{source}: model_config"
    hints = typing.get_type_hints(ModelConfig)
    unknown = [str(key)[:60] for key in raw if key not in hints]
    if unknown:
        raise CheckpointError(f"{where}: unknown field {unknown[0]!r}"
                              f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; "
                              f"known: {', '.join(hints)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        kind = hints[name]
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{where}: {name} is {str(value)[:40]!r} "
                                  f"({type(value).__name__}), expected {kind.__name__}")
        values[name] = float(value) if kind is float else value
    cfg = ModelConfig(**values)
    for name, (low, high) in SIZE_LIMITS.items():
        if not low <= getattr(cfg, name) <= high:
            raise CheckpointError(f"{where}: {name} {getattr(cfg, name)} is outside [{low}, {high}]")
    if not (0 < cfg.mlp_ratio <= MAX_MLP_RATIO and math.isfinite(cfg.init_logit_scale)):
        raise CheckpointError(f"{where}: mlp_ratio {cfg.mlp_ratio} must be in (0, {MAX_MLP_RATIO}] "
                              f"and init_logit_scale {cfg.init_logit_scale} finite")
    if cfg.image_size % cfg.patch_size or (cfg.image_size // cfg.patch_size) ** 2 > MAX_PATCHES:
        raise CheckpointError(f"{where}: image_size {cfg.image_size} must be a multiple of "
                              f"patch_size {cfg.patch_size} giving at most {MAX_PATCHES} patches")
    for tower in ("vision", "text"):
        width, heads = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
        if width % heads or int(width * cfg.mlp_ratio) < 1:
            raise CheckpointError(f"{where}: {tower}_width {width} must be a multiple of "
                                  f"{tower}_heads {heads} (and width x mlp_ratio at least 1)")
    count = estimate_parameters(cfg)
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: asks for {count / 1e9:.1f}e9 parameters, above the "
                              f"{MAX_PARAMETERS / 1e9:.0f}e9 a checkpoint may hold")
    return cfg


def describe_model(cfg: ModelConfig) -> str:
    """'tiny (image 64/16, vision 64 wide x 2 layers x 2 heads, ...)' for error messages."""
    arch = {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS if name != "vocab_size"}
    preset = next((name for name in ("tiny", "base", "base16", "large")
                   if all(getattr(ModelConfig.preset(name), k) == v for k, v in arch.items())), "custom")
    return (f"{preset} (image {cfg.image_size}/{cfg.patch_size}, vision {cfg.vision_width} wide x "
            f"{cfg.vision_layers} layers x {cfg.vision_heads} heads, text {cfg.text_width} wide x "
            f"{cfg.text_layers} layers x {cfg.text_heads} heads, mlp {cfg.mlp_ratio:g}, vocab "
            f"{cfg.vocab_size}, context {cfg.context_length}, embed {cfg.embed_dim})")


def check_same_model(found: ModelConfig, expected: ModelConfig, path: str | os.PathLike[str]) -> None:
    """Resume only into the model the checkpoint was trained as: same architecture fields."""
    differ = [name for name in ARCHITECTURE_FIELDS if getattr(found, name) != getattr(expected, name)]
    if differ:
        raise CheckpointError(f"checkpoint {path}: model {describe_model(found)} does not match "
                              f"the config's {describe_model(expected)}; differs in {', '.join(differ)}")


def check_model_tensors(tensors: dict[Any, Any], shapes: dict[str, torch.Size],
                        path: str | os.PathLike[str]) -> None:
    """The checkpoint's model tensors are exactly `shapes`, and the file really holds their data."""
    where = f"checkpoint {path}: model tensors"
    missing = [name for name in shapes if name not in tensors]
    unexpected = [str(name)[:80] for name in tensors if name not in shapes]
    if missing or unexpected:
        raise CheckpointError(f"{where} do not match its model_config: {len(missing)} missing "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    stored: dict[int, int] = {}
    needed = 0
    for name, shape in shapes.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise CheckpointError(f"{where}: {name} is not a floating-point tensor")
        if tensor.shape != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(tensor.shape)} in the file, "
                                  f"{list(shape)} in the model")
        storage = tensor.untyped_storage()
        stored[storage.data_ptr()] = storage.nbytes()
        needed += tensor.numel() * tensor.element_size()
    # Zero strides let a tiny storage pose as a huge tensor: the file must hold every element.
    if sum(stored.values()) < needed:
        raise CheckpointError(f"{where} declare {needed} bytes but the file holds {sum(stored.values())}")


def model_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter shapes of FilipModel(cfg), built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in FilipModel(cfg).state_dict().items()}


@contextlib.contextmanager
def checkpoint_part(path: str | os.PathLike[str], part: str) -> Iterator[None]:
    """Turn a failure to apply one part of a checkpoint (optimizer, RNG...) into a CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        reason = " ".join((str(error).splitlines() or [""])[0].split())[:200]
        raise CheckpointError(f"checkpoint {path}: its {part} does not fit this run "
                              f"({type(error).__name__}: {reason})") from None


def check_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike[str]) -> None:
    """Each per-parameter buffer (Adam moments) has its parameter's shape, or the first step fails."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                    raise CheckpointError(f"checkpoint {path}: optimizer {key} has shape "
                                          f"{list(value.shape)} for a parameter of {list(param.shape)}")


def restore_scaler_state(scaler: Any, state: Any, path: str | os.PathLike[str]) -> None:
    """Load a saved GradScaler state into `scaler` (an fp16 run). A checkpoint without one (a bf16
    or fp32 run) leaves the scaler fresh; a run without a scaler ignores a saved state."""
    if scaler is None or state is None:
        return
    scale = state.get("scale") if isinstance(state, dict) else None
    # A zero, negative or NaN scale would silently zero or poison every later gradient.
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise CheckpointError(f"checkpoint {path}: its GradScaler scale {str(scale)[:40]} is not a "
                              f"finite positive number")
    scaler.load_state_dict(state)


def load_for_resume(path: str | os.PathLike[str], model: nn.Module,
                    model_config: ModelConfig) -> dict[str, Any]:
    """Check a training checkpoint against the run's model, load its weights; returns the state."""
    state = load_checkpoint(path, map_location="cpu", required=TRAINING_KEYS)
    check_same_model(model_config_from_dict(state["model_config"], f"checkpoint {path}"), model_config, path)
    check_model_tensors(state["model"], {k: v.shape for k, v in unwrap(model).state_dict().items()}, path)
    unwrap(model).load_state_dict(state["model"])
    return state


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
    cfg = model_config_from_dict(state["model_config"], f"checkpoint {path}")
    cfg.grad_checkpointing = False
    check_model_tensors(state["model"], model_shapes(cfg), path)
    tokenizer = _checkpoint_tokenizer(state, cfg, path)
    model = FilipModel(cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return InferenceBundle(model=model, tokenizer=tokenizer, loss_kind=state["loss_kind"],
                           image_transform=eval_transform(cfg.image_size), step=state["step"])


def _checkpoint_tokenizer(state: dict[str, Any], cfg: ModelConfig,
                          path: str | os.PathLike[str]) -> FilipTokenizer:
    """The embedded tokenizer, if it parses and its ids and length fit the model."""
    proto, context = state["tokenizer_proto"], state["context_length"]
    if proto.dtype != torch.uint8 or proto.ndim != 1 or not 3 <= context <= cfg.context_length:
        raise CheckpointError(f"checkpoint {path}: tokenizer_proto must be 1-D uint8 and "
                              f"context_length {context} in [3, {cfg.context_length}]")
    try:
        tokenizer = FilipTokenizer(proto.numpy().tobytes(), context)
    except Exception as error:  # sentencepiece raises RuntimeError or its own types on garbage
        raise CheckpointError(f"checkpoint {path}: its tokenizer does not load "
                              f"({type(error).__name__})") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"checkpoint {path}: tokenizer of {tokenizer.vocab_size} pieces "
                              f"for a model of vocab_size {cfg.vocab_size}")
    return tokenizer
