"""Bad checkpoints and unreadable shards through the real `filip eval`, `filip align` and
`filip train`: exit 2 with one `error:` line naming the file, no traceback, no model allocated
for a checkpoint that asks for a huge one, and no endless retrying of shards that never read."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from tests.bad_input.cli import assert_user_error, run_filip

WORDS = "a dog cat runs on the grass red ball child plays with water beach man woman bike".split()


def _tiny_shard(path: Path, samples: int) -> None:
    from PIL import Image

    rng = random.Random(0)
    with tarfile.open(path, "w") as tar:
        for index in range(samples):
            image = io.BytesIO()
            Image.new("RGB", (80, 80), tuple(rng.randrange(256) for _ in range(3))).save(image, "JPEG")
            caption = " ".join(rng.choices(WORDS, k=6)).encode()
            for name, payload in ((f"{index:04d}.jpg", image.getvalue()), (f"{index:04d}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One readable shard of 8 generated images with `tokenizer.model` beside it."""
    from filip.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    _tiny_shard(folder / "00000.tar", 8)
    rng = random.Random(1)
    train_tokenizer([" ".join(rng.choices(WORDS, k=8)) for _ in range(300)], folder / "tokenizer.model", 200)
    return folder


def _train_config(path: Path, shards: Path, output: Path, resampled: bool = False,
                  **model: Any) -> Path:
    config = {
        "model": {"preset": "tiny", **model},
        "data": {"shards": str(shards), "batch_size": 4, "num_workers": 2, "shuffle_buffer": 4,
                 "resampled": resampled, "auto_augment": False},
        "loss": {"kind": "filip", "gather_dtype": "float32"},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 1},
        "run": {"output_dir": str(output), "max_steps": 2, "progress_bar": False, "cpu_threads": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def good_checkpoint(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint of the tiny model (step 0), as `filip train` writes it."""
    from filip.checkpoint import save_checkpoint
    from filip.model import FilipModel, ModelConfig
    from filip.tokenizer import FilipTokenizer
    from filip.trainer import parameter_groups

    tokenizer = FilipTokenizer.load(corpus / "tokenizer.model")
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    model = FilipModel(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(tmp_path_factory.mktemp("good") / "step_00000000.pt", model=model,
                           model_config=config, tokenizer=tokenizer, loss_kind="filip", step=0,
                           optimizer=optimizer, scheduler=scheduler,
                           data_state={"world_size": 1, "ranks": [{"epoch": 0, "next_worker": 0,
                                                                   "workers": {}}]})


def _crafted(**model_config: Any) -> Callable[[Path, Path], Path]:
    """The good checkpoint with its weights dropped and `model_config` changed: a small file."""
    def write(folder: Path, good: Path) -> Path:
        state = torch.load(good, weights_only=True)
        state.update(model_config={**state["model_config"], **model_config}, model={}, optimizer={})
        torch.save(state, folder / "crafted.pt")
        return folder / "crafted.pt"
    return write


def _bytes(make: Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def write(folder: Path, good: Path) -> Path:
        (folder / "bad.pt").write_bytes(make(good))
        return folder / "bad.pt"
    return write


# (case, writes the bad checkpoint, what the message must say besides the file's path)
CHECKPOINTS: list[tuple[str, Callable[[Path, Path], Path], list[str]]] = [
    ("garbage", _bytes(lambda good: random.Random(2).randbytes(4096)), ["not a checkpoint"]),
    ("text", _bytes(lambda good: b"not a checkpoint at all\n" * 50), ["not a checkpoint"]),
    ("empty", _bytes(lambda good: b""), ["the file is empty"]),
    ("truncated", _bytes(lambda good: good.read_bytes()[: good.stat().st_size * 2 // 3]),
     ["truncated or corrupt"]),
    # 16384 wide x 256 layers: 0.8e12 parameters (3.3 TB of float32) asked for by a small file.
    ("huge_model", _crafted(vision_width=16384, vision_layers=256, vision_heads=128),
     ["model_config: asks for 824.7e9 parameters"]),
    ("unknown_field", _crafted(colour="red"), ["model_config: unknown field 'colour'"]),
]
COMMANDS = ["eval", "align", "train"]


def _command(command: str, checkpoint: Path, corpus: Path, folder: Path) -> list[Any]:
    if command == "eval":
        return ["eval", checkpoint, "--retrieval", folder / "captions.csv"]
    if command == "align":
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "image.png")
        return ["align", checkpoint, folder / "image.png", "a red square", "--out", folder / "a.png"]
    config = _train_config(folder / "train.yaml", corpus, folder / "run")
    return ["train", config, "--resume", checkpoint]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case, write, must_say", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_bad_checkpoint_is_one_error_line(tmp_path: Path, corpus: Path, good_checkpoint: Path, command: str,
                                          case: str, write: Callable[[Path, Path], Path],
                                          must_say: list[str]) -> None:
    bad = write(tmp_path, good_checkpoint)
    if case == "huge_model":
        assert bad.stat().st_size < 1_000_000
    result = run_filip(*_command(command, bad, corpus, tmp_path), timeout=120)
    assert_user_error(result, f"checkpoint {bad}: ", *must_say)
    assert not (tmp_path / "a.png").exists() and not list((tmp_path / "run").glob("step_*.pt"))


def test_resume_into_another_model_names_both(tmp_path: Path, corpus: Path, good_checkpoint: Path) -> None:
    config = _train_config(tmp_path / "train.yaml", corpus, tmp_path / "run", vision_width=128)
    result = run_filip("train", config, "--resume", good_checkpoint, timeout=120)
    line = assert_user_error(result, f"checkpoint {good_checkpoint}: model tiny (image 64/16, vision 64 wide",
                             "does not match the config's custom (image 64/16, vision 128 wide",
                             "differs in vision_width")
    assert line.count("vocab ") == 2
    assert not list((tmp_path / "run").glob("step_*.pt"))


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "once"])
def test_unreadable_shards_end_training_with_an_error(tmp_path: Path, corpus: Path, resampled: bool) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = random.Random(3)
    for index in range(3):
        (shards / f"{index:05d}.tar").write_bytes(rng.randbytes(5000))
    (shards / "tokenizer.model").write_bytes((corpus / "tokenizer.model").read_bytes())
    config = _train_config(tmp_path / "train.yaml", shards, tmp_path / "run", resampled=resampled)
    # Before the bound, a resampled stream retried these shards forever: the timeout is the test.
    result = run_filip("train", config, timeout=120)
    reason = "no sample could be read from 32 shards in a row" if resampled else "read no batch of 4 samples"
    assert_user_error(result, f"data.shards '{shards}'", reason)
    assert not list((tmp_path / "run").glob("step_*.pt"))
