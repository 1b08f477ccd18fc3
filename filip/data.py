"""Streaming training data from the pipeline's WebDataset shards.

Every random choice (shard order, shuffle buffer, crop, AutoAugment, which caption) is drawn from
a generator seeded by (seed, epoch, rank, worker, position), so a stream is a pure function of its
position: a resumed run skips the consumed samples *before* decoding and then sees exactly the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from filip.model import IMAGE_MEAN, IMAGE_STD
from filip.tokenizer import FilipTokenizer
from pipeline.errors import UserError

BACK_TRANSLATION_KEYS = ("caption_bt_de", "caption_bt_ru")
# A resampled stream never runs out of shards, so unreadable shards would be retried forever: a
# worker stops after opening this many shards in a row without one image sample. Far above what
# a few bad shards in a good corpus reach (even half bad: odds 2**-32 per shard).
MAX_SHARDS_WITHOUT_SAMPLE = 32
# Likewise for shards that read but hold only images that do not decode.
MAX_UNDECODABLE_IN_A_ROW = 10_000
logger = logging.getLogger(__name__)


class ShardReadError(UserError):
    """The shards yield no usable sample: unreadable, not WebDataset tars, or no decodable image."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, it is rebuilt in the main process with the worker's whole
        # traceback as its message; keep our own last line so the CLI still prints one line.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def eval_transform(image_size: int) -> Callable[[Any], torch.Tensor]:
    """Resize the short side, center crop, normalise: PIL image -> [3, S, S] float tensor."""
    from torchvision import transforms as T

    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGE_MEAN, IMAGE_STD),
    ])


def train_transform(image_size: int, crop_scale_min: float = 0.5,
                    auto_augment: bool = True) -> Callable[[Any], torch.Tensor]:
    """RandomResizedCrop (+ AutoAugment) then normalise; randomness from torch's global RNG."""
    from torchvision import transforms as T

    steps: list[Any] = [T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0),
                                            interpolation=T.InterpolationMode.BICUBIC)]
    if auto_augment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    steps += [T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)]
    return T.Compose(steps)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a list, a folder (all *.tar), a glob or a brace pattern `{00000..00009}`."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
    elif "{" in spec:
        import braceexpand

        found = list(braceexpand.braceexpand(spec))
    else:
        found = sorted(glob(spec))
    if not found:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return found


def pick_caption(sample: dict[str, Any], rng: random.Random) -> str:
    """The original caption or one of its back-translations, uniformly."""
    candidates = [sample["txt"].decode("utf-8", "replace")] if "txt" in sample else []
    if "json" in sample:
        meta = json.loads(sample["json"])
        candidates += [meta[k] for k in BACK_TRANSLATION_KEYS if isinstance(meta.get(k), str) and meta[k].strip()]
    if not candidates:
        raise ValueError(f"sample {sample.get('__key__')} has no caption")
    return rng.choice(candidates)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def _one_line(text: object, limit: int = 200) -> str:
    """Untrusted text (tar member names, library errors) made fit for a one-line error."""
    return " ".join(str(text).split())[:limit]


class _ShardTries:
    """Shards opened since the last image sample, and the last read error, of one worker."""

    def __init__(self, limit: int) -> None:
        self.limit, self.without_sample = limit, 0
        self.last_shard, self.last_error = "", "none"

    def handler(self, error: Exception) -> bool:
        """webdataset's error handler: remember the error, log it, go on with the next shard."""
        # webdataset appends the url and stream to the args; the first one is the reason.
        self.last_error = f"{type(error).__name__}: {_one_line(error.args[0] if error.args else '')}"
        logger.warning("skipping unreadable shard data in %s: %s", self.last_shard, self.last_error)
        return True

    def next_shard(self, shard: str) -> None:
        if self.without_sample >= self.limit:
            raise ShardReadError(
                f"no sample could be read from {self.limit} shards in a row under "
                f"{Path(shard).parent} (last {self.last_shard}: {self.last_error}); "
                f"are they the pipeline's WebDataset .tar shards?")
        self.without_sample += 1
        self.last_shard = shard


class ShardDataset(IterableDataset):
    """Batches of (images, token ids, mask) streamed from tar shards, split by rank and worker.

    `resume[w] = (position, batch_index)` makes logical worker `w` skip its first `position` raw
    samples without decoding them and number its batches from `batch_index` (resume).
    `worker_offset` maps DataLoader worker k to logical worker (k + offset) % num_workers, so a
    resumed DataLoader, which always starts at worker 0, continues the uninterrupted order.
    """

    def __init__(self, shards: list[str], tokenizer: FilipTokenizer, batch_size: int,
                 image_transform: Callable[[Any], torch.Tensor], *, seed: int = 0, epoch: int = 0,
                 resampled: bool = False, shuffle_buffer: int = 1000, rank: int = 0,
                 world_size: int = 1, resume: dict[int, tuple[int, int]] | None = None,
                 worker_offset: int = 0, max_shards_without_sample: int = MAX_SHARDS_WITHOUT_SAMPLE,
                 max_undecodable_in_a_row: int = MAX_UNDECODABLE_IN_A_ROW) -> None:
        super().__init__()
        self.shards, self.tokenizer, self.batch_size = list(shards), tokenizer, batch_size
        self.image_transform = image_transform
        self.seed, self.epoch, self.resampled = seed, epoch, resampled
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.resume = {int(k): (int(v[0]), int(v[1])) for k, v in (resume or {}).items()}
        self.worker_offset = worker_offset
        self.max_shards_without_sample = max_shards_without_sample
        self.max_undecodable_in_a_row = max_undecodable_in_a_row

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.worker_offset) % info.num_workers, info.num_workers

    def _my_shards(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            # Sampling with replacement: every rank/worker draws its own endless shard sequence.
            rng = random.Random(_mix(self.seed, self.rank, worker, 1))
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        random.Random(_mix(self.seed, self.epoch, 2)).shuffle(order)
        mine = order[self.rank::self.world_size][worker::num_workers]
        if not mine:
            logger.warning("rank %d worker %d has no shard (%d shards for %d ranks x %d workers)",
                           self.rank, worker, len(order), self.world_size, num_workers)
        yield from mine

    def _raw_samples(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        tries = _ShardTries(self.max_shards_without_sample)

        def urls() -> Iterator[dict[str, str]]:
            for url in self._my_shards(worker, num_workers):
                tries.next_shard(url)  # raises once too many shards in a row gave nothing
                yield {"url": url}

        samples = wds.tarfile_to_samples(handler=tries.handler)(urls())
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, 3))
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if "jpg" not in sample:
                continue
            # Counted here, before the shuffle buffer, which may hold many shards' worth.
            tries.without_sample = 0
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from PIL import Image

        worker, num_workers = self._worker()
        skip, batch_index = self.resume.get(worker, (0, 0))
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        undecodable = 0
        for position, sample in enumerate(self._raw_samples(worker, num_workers)):
            if position < skip:
                continue  # consumed before the resume: not even decoded
            sample_seed = _mix(self.seed, self.epoch, self.rank, worker, position)
            try:
                image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                caption = pick_caption(sample, random.Random(sample_seed))
                # A private RNG stream per sample keeps augmentation identical after a resume.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed)
                    images.append(self.image_transform(image))
                captions.append(caption)
                keys.append(str(sample.get("__key__")))
            except Exception as error:  # a bad sample must not stop a long run
                logger.warning("skipping sample %s: %s", sample.get("__key__"), error)
                undecodable += 1
                if undecodable >= self.max_undecodable_in_a_row:  # ... but a stream of them must
                    raise ShardReadError(
                        f"{undecodable} samples in a row did not decode, the last "
                        f"{_one_line(sample.get('__key__'), 100)} in {sample.get('__url__')}: "
                        f"{type(error).__name__}: {_one_line(error)}") from None
                continue
            undecodable = 0
            if len(images) == self.batch_size:
                ids, mask = self.tokenizer(captions)
                yield {"images": torch.stack(images), "ids": ids, "mask": mask, "keys": keys,
                       "worker": worker, "batch_index": batch_index, "epoch": self.epoch,
                       "position": position + 1}
                batch_index += 1
                images, captions, keys = [], [], []
        # A partial last batch is dropped: every step sees the same global batch size.


def make_loader(dataset: ShardDataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False)
