"""Checkpoints as untrusted input: every bad file is one CheckpointError naming it, found before
a model is allocated; a good one loads exactly."""
from __future__ import annotations

import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

import filip.checkpoint as checkpoint_module
from filip.checkpoint import (MAX_PARAMETERS, TRAINING_KEYS, CheckpointError, check_model_tensors,
                              check_optimizer_state, check_same_model, checkpoint_part, estimate_parameters,
                              load_checkpoint, load_for_inference, load_for_resume, model_config_from_dict,
                              model_shapes, save_checkpoint)
from filip.model import FilipModel, ModelConfig
from filip.tokenizer import FilipTokenizer, train_tokenizer
from pipeline.errors import UserError

WORDS = "a dog cat runs on the grass red ball child plays with water beach man woman bike".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> FilipTokenizer:
    rng = random.Random(0)
    captions = [" ".join(rng.choices(WORDS, k=8)) for _ in range(300)]
    path = train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tokenizer.model", 200)
    return FilipTokenizer.load(path)


@pytest.fixture(scope="module")
def tiny_config(tokenizer: FilipTokenizer) -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer: FilipTokenizer,
          tiny_config: ModelConfig) -> Path:
    """A freshly initialised tiny checkpoint with optimizer state, as the trainer writes it."""
    torch.manual_seed(0)
    model = FilipModel(tiny_config)
    optimizer = torch.optim.AdamW(model.parameters())
    out = model(torch.zeros(2, 3, 64, 64), *tokenizer(["a dog", "a cat"]))
    (out["image_tokens"].sum() + out["text_tokens"].sum() + out["logit_scale"]).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_00000001.pt", model=model,
                           model_config=tiny_config, tokenizer=tokenizer, loss_kind="filip", step=1,
                           optimizer=optimizer, scheduler=scheduler,
                           data_state={"world_size": 1, "ranks": []})


def resave(saved: Path, path: Path, drop: tuple[str, ...] = (), **changes: Any) -> Path:
    """`saved` with keys dropped or changed, written to `path`."""
    state = torch.load(saved, weights_only=True)
    state.update(changes)
    for key in drop:
        del state[key]
    torch.save(state, path)
    return path


def test_checkpoint_error_is_a_user_error() -> None:
    assert issubclass(CheckpointError, UserError)


def test_good_checkpoint_loads_the_exact_weights(saved: Path) -> None:
    bundle = load_for_inference(saved)
    stored = torch.load(saved, weights_only=True)["model"]
    assert bundle.step == 1 and bundle.loss_kind == "filip" and not bundle.model.training
    for name, tensor in bundle.model.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


@pytest.mark.parametrize("name", ["tiny", "base", "base16", "large"])
def test_parameter_estimate_is_exact(name: str) -> None:
    for cfg in (ModelConfig.preset(name), ModelConfig.preset(name, mlp_ratio=2.7, vocab_size=123)):
        assert estimate_parameters(cfg) == sum(s.numel() for s in model_shapes(cfg).values())


def write_bytes(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda d, s: write_bytes(d / "x.pt", bytes(random.Random(1).randbytes(4000))),
     "not a checkpoint (not a PyTorch file of tensors and plain containers)"),
    # The text case used to be torch's bare `KeyError: 101`.
    (lambda d, s: write_bytes(d / "x.pt", b"hello, not a checkpoint\n" * 20),
     "not a checkpoint (KeyError: 101)"),
    (lambda d, s: write_bytes(d / "x.pt", b""), "the file is empty"),
    (lambda d, s: write_bytes(d / "x.pt", s.read_bytes()[: s.stat().st_size // 2]),
     "truncated or corrupt (its zip archive cannot be read)"),
    (lambda d, s: d / "missing.pt", "no such file"),
    (lambda d, s: d, "a folder, not a checkpoint file"),
])
def test_unreadable_file_is_one_error_naming_it(make: Any, reason: str, saved: Path, tmp_path: Path) -> None:
    path = make(tmp_path, saved)
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(path)
    assert str(caught.value) == f"checkpoint {path}: {reason}"


def test_torch_file_of_something_else_names_what_is_missing(saved: Path, tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: not a `filip train` checkpoint "
                                              r"\(it holds a list, not a mapping\)$"):
        load_for_inference(tmp_path / "list.pt")
    torch.save({"model": {}, "step": 3}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(tmp_path / "dict.pt")
    assert str(caught.value) == (f"checkpoint {tmp_path / 'dict.pt'}: not a `filip train` checkpoint "
                                 f"(no format, loss_kind, model_config, tokenizer_proto, context_length)")
    path = resave(saved, tmp_path / "step.pt", step="one")
    with pytest.raises(CheckpointError, match=r"step\.pt: step is a str, expected int$"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"not a `filip train` checkpoint \(no optimizer, scheduler, "
                                              r"rng, data_state\)$"):
        bare = resave(saved, tmp_path / "bare.pt", drop=("optimizer", "scheduler", "rng", "data_state"))
        load_checkpoint(bare, required=TRAINING_KEYS)


@pytest.mark.parametrize("change, message", [
    ({"colour": 3}, "unknown field 'colour'; known: embed_dim, image_size"),
    ({"vision_width": "64"}, "vision_width is '64' (str), expected int"),
    ({"vision_layers": True}, "vision_layers is 'True' (bool), expected int"),
    ({"grad_checkpointing": 1}, "grad_checkpointing is '1' (int), expected bool"),
    ({"vision_width": 0}, "vision_width 0 is outside [1, 16384]"),
    ({"text_layers": 10_000}, "text_layers 10000 is outside [1, 256]"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio nan must be in (0, 64.0]"),
    ({"image_size": 64, "patch_size": 24}, "image_size 64 must be a multiple of patch_size 24"),
    ({"image_size": 8192, "patch_size": 16}, "giving at most 65536 patches"),
    ({"vision_width": 100, "vision_heads": 3}, "vision_width 100 must be a multiple of vision_heads 3"),
    # 16384 wide x 256 layers: 0.8e12 parameters (3.3 TB) asked for by a small file.
    ({"vision_width": 16384, "vision_layers": 256, "vision_heads": 128},
     "asks for 824.7e9 parameters, above the 2e9 a checkpoint may hold"),
])
def test_model_config_is_checked_before_any_allocation(change: dict[str, Any], message: str, saved: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**torch.load(saved, weights_only=True)["model_config"], **change}
    path = resave(saved, tmp_path / "bad.pt", model_config=config, model={}, optimizer=None)
    monkeypatch.setattr(checkpoint_module, "FilipModel", lambda cfg: pytest.fail("model built"))
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(path)
    assert str(caught.value).startswith(f"checkpoint {path}: model_config: ")
    assert message in str(caught.value)
    assert path.stat().st_size < 1_000_000  # the ask, not the file, is what is large


def test_huge_config_is_refused_by_the_cap() -> None:
    base = asdict(ModelConfig.preset("large"))
    assert estimate_parameters(ModelConfig.preset("large")) < MAX_PARAMETERS
    with pytest.raises(CheckpointError, match=r"^src: model_config: asks for 2\.5e9 parameters"):
        model_config_from_dict({**base, "vision_width": 4096, "vision_heads": 32, "vision_layers": 12}, "src")


def test_tensors_must_match_the_config_exactly(saved: Path, tiny_config: ModelConfig) -> None:
    model = torch.load(saved, weights_only=True)["model"]
    shapes = model_shapes(tiny_config)
    check_model_tensors(model, shapes, "ok.pt")
    wrong = {**model, "visual.pos_embed": torch.zeros(1, 5, 64)}
    with pytest.raises(CheckpointError) as caught:
        check_model_tensors(wrong, shapes, "x.pt")
    assert str(caught.value) == ("checkpoint x.pt: model tensors: visual.pos_embed has shape [1, 5, 64] "
                                 "in the file, [1, 17, 64] in the model")
    missing = {k: v for k, v in model.items() if k != "logit_scale"} | {"extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"do not match its model_config: 1 missing \['logit_scale'\], "
                                              r"1 unexpected \['extra'\]$"):
        check_model_tensors(missing, shapes, "x.pt")
    with pytest.raises(CheckpointError, match=r"logit_scale is not a floating-point tensor$"):
        check_model_tensors({**model, "logit_scale": torch.tensor(3)}, shapes, "x.pt")


def test_zero_stride_tensors_cannot_pose_as_real_weights(saved: Path, tiny_config: ModelConfig,
                                                          tmp_path: Path) -> None:
    # One float expanded to every parameter's shape: a few bytes in the file that claim megabytes.
    fake = {name: torch.zeros(()).expand(shape) for name, shape in model_shapes(tiny_config).items()}
    path = resave(saved, tmp_path / "strided.pt", model=fake)
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(path)
    declared, held = 4 * estimate_parameters(tiny_config), 4 * len(fake)
    assert str(caught.value) == (f"checkpoint {path}: model tensors declare {declared} bytes "
                                 f"but the file holds {held}")


def test_other_model_on_resume_names_both(tiny_config: ModelConfig) -> None:
    other = replace(tiny_config, vision_width=128, text_layers=3)
    with pytest.raises(CheckpointError) as caught:
        check_same_model(tiny_config, other, "c.pt")
    vocab = tiny_config.vocab_size
    assert str(caught.value) == (
        "checkpoint c.pt: model tiny (image 64/16, vision 64 wide x 2 layers x 2 heads, text 64 wide x "
        f"2 layers x 2 heads, mlp 4, vocab {vocab}, context 77, embed 256) does not match the config's "
        "custom (image 64/16, vision 128 wide x 2 layers x 2 heads, text 64 wide x 3 layers x 2 heads, "
        f"mlp 4, vocab {vocab}, context 77, embed 256); differs in vision_width, text_layers")


def test_resume_loads_weights_only_into_the_same_model(saved: Path, tiny_config: ModelConfig) -> None:
    model = FilipModel(tiny_config)
    state = load_for_resume(saved, model, tiny_config)
    assert torch.equal(model.logit_scale, state["model"]["logit_scale"]) and state["step"] == 1
    other = ModelConfig.preset("tiny", vocab_size=tiny_config.vocab_size, vision_layers=3)
    untouched = FilipModel(other)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"differs in vision_layers$"):
        load_for_resume(saved, untouched, other)
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())


def test_optimizer_state_of_another_shape_is_refused(saved: Path, tiny_config: ModelConfig) -> None:
    model = FilipModel(tiny_config)
    optimizer = torch.optim.AdamW(model.parameters())
    state = torch.load(saved, weights_only=True)["optimizer"]
    optimizer.load_state_dict(state)
    check_optimizer_state(optimizer, "c.pt")
    state["state"][1]["exp_avg"] = torch.zeros(3)
    optimizer.load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"^checkpoint c\.pt: optimizer exp_avg has shape \[3\] for a "
                                              r"parameter of \[1, 1, 64\]$"):
        check_optimizer_state(optimizer, "c.pt")


def test_checkpoint_part_makes_one_line() -> None:
    with pytest.raises(CheckpointError) as caught:
        with checkpoint_part("c.pt", "RNG state"):
            raise ValueError("first line\nsecond line")
    assert str(caught.value) == ("checkpoint c.pt: its RNG state does not fit this run "
                                 "(ValueError: first line)")


def test_tokenizer_must_parse_and_fit(saved: Path, tmp_path: Path) -> None:
    path = resave(saved, tmp_path / "tok.pt", tokenizer_proto=torch.zeros(50, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match=r"tok\.pt: its tokenizer does not load \(\w+\)$"):
        load_for_inference(path)
    path = resave(saved, tmp_path / "ctx.pt", context_length=500)
    with pytest.raises(CheckpointError, match=r"context_length 500 in \[3, 77\]$"):
        load_for_inference(path)
