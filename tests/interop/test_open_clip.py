"""open_clip's own trainer (`open_clip_train.main`) trains on the final shards as they are: it finds
the sample count in `shards/sizes.json` (no `--train-num-samples`) and reads every image."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

# Two layers a side and 32 px images: a real CLIP, small enough for 2 steps on 2 CPU cores.
TINY_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    # open_clip's default tokenizer (CLIP's BPE, shipped in the package) needs its vocabulary size.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# open_clip picks a model config by name from its registry; add_model_config puts ours there.
ENTRY = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
         "from open_clip_train.main import main; main(sys.argv[2:])")
LOSS = re.compile(r"Train Epoch: 0 .* Contrastive_loss: (\S+) \(")


def test_open_clip_trains_two_steps_on_the_shards(interop_corpus: Path, tmp_path: Path) -> None:
    shards = interop_corpus / "shards"
    sizes = json.loads((shards / "sizes.json").read_text())
    names = sorted(sizes)
    assert names == sorted(p.name for p in shards.glob("*.tar")) and len(names) >= 2
    total = sum(sizes.values())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-interop.json").write_text(json.dumps(TINY_MODEL))
    first, last = names[0].removesuffix(".tar"), names[-1].removesuffix(".tar")
    argv = [sys.executable, "-c", ENTRY, str(tmp_path / "models"),
            "--train-data", f"{shards}/{{{first}..{last}}}.tar", "--dataset-type", "webdataset",
            "--model", "tiny-interop", "--batch-size", str(total // 2), "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3",
            "--warmup", "1", "--log-every-n-steps", "1", "--save-frequency", "0",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--seed", "0",
            "--logs", str(tmp_path / "logs"), "--name", "run"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    log = (tmp_path / "logs" / "run" / "out.log")
    text = log.read_text() if log.exists() else ""
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(value) for value in LOSS.findall(text)]
    # total // 2 per batch: exactly two full batches in the epoch whatever the total's parity.
    assert len(losses) == 2, text[-3000:]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
