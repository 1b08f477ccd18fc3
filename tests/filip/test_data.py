"""Streaming shards: batch layout, rank split, caption choice, exact resume with workers."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from filip.data import (ShardDataset, eval_transform, expand_shards, make_loader, pick_caption,
                        train_transform)
from filip.tokenizer import FilipTokenizer
from filip.trainer import DataPosition


def dataset(shards: list[str], **kwargs: Any) -> ShardDataset:
    tokenizer = FilipTokenizer.load(Path(shards[0]).parent / "tokenizer.model")
    kwargs.setdefault("shuffle_buffer", 50)
    return ShardDataset(shards, tokenizer, kwargs.pop("batch_size", 20),
                        train_transform(64, 0.8, auto_augment=True), seed=3, **kwargs)


def test_batches_have_images_ids_and_masks(flickr_shards: list[str]) -> None:
    batch = next(iter(dataset(flickr_shards)))
    assert batch["images"].shape == (20, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["ids"].shape == batch["mask"].shape == (20, 77)
    assert len(set(batch["keys"])) == 20 and batch["position"] == 20


def test_ranks_read_disjoint_shards_that_cover_the_data(flickr_shards: list[str]) -> None:
    seen = []
    for rank in range(2):
        keys = [k for b in dataset(flickr_shards, rank=rank, world_size=2) for k in b["keys"]]
        assert len(keys) == 200  # 2 of the 4 shards, 100 samples each
        seen.append(set(keys))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 400


def test_caption_drawn_uniformly_from_original_and_back_translations() -> None:
    sample = {"txt": b"original", "json": json.dumps(
        {"caption_bt_de": "german round trip", "caption_bt_ru": "russian round trip"}).encode()}
    rng = random.Random(0)
    counts: dict[str, int] = {}
    for _ in range(3000):
        caption = pick_caption(sample, rng)
        counts[caption] = counts.get(caption, 0) + 1
    assert set(counts) == {"original", "german round trip", "russian round trip"}
    assert all(900 < n < 1100 for n in counts.values())
    assert pick_caption({"txt": b"only", "json": b"{}"}, rng) == "only"


def test_resume_with_two_workers_continues_the_same_stream(flickr_shards: list[str]) -> None:
    full = list(make_loader(dataset(flickr_shards), num_workers=2))
    assert len(full) == 20
    consumed = 7  # an odd count: the resumed loader must start at the second worker
    position = DataPosition()
    for batch in full[:consumed]:
        position.workers[batch["worker"]] = (batch["position"], batch["batch_index"] + 1)
        position.next_worker = (batch["worker"] + 1) % 2
    state = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
    resumed = list(make_loader(dataset(flickr_shards, resume=state.workers,
                                       worker_offset=state.next_worker), num_workers=2))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[consumed:]]
    for a, b in zip(resumed, full[consumed:]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["ids"], b["ids"])


def test_expand_shards_forms(flickr_shards: list[str]) -> None:
    folder = Path(flickr_shards[0]).parent
    assert expand_shards(str(folder)) == flickr_shards
    assert expand_shards(str(folder / "{00000..00001}.tar")) == flickr_shards[:2]
    assert expand_shards(str(folder / "*.tar")) == flickr_shards
    with pytest.raises(FileNotFoundError):
        expand_shards(str(folder / "missing-*.tar"))


def test_eval_transform_resizes_and_crops() -> None:
    from PIL import Image

    out = eval_transform(64)(Image.new("L", (200, 100), 128))
    assert out.shape == (3, 64, 64)
