"""Streaming training data from the pipeline's WebDataset shards.

Every random choice (shard order, shuffle buffer, crop, AutoAugment, which caption) is drawn from
a generator seeded by (seed, epoch, rank, worker, and the shard, sample or position index), so a
stream is a pure function of a small state: where its reading continues (shard index, sample
index in it), which samples its shuffle buffer holds (as shard and sample indices) and how many
it has emitted. Each batch carries that state; a resumed loader seeks to and reads only the
buffered samples, whatever the step, and then yields exactly the batches an uninterrupted run
would have.
"""
from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from filip.model import IMAGE_MEAN, IMAGE_STD
from filip.shard_reader import fetch_shard_samples, is_object_url, iter_shard_samples
from filip.tokenizer import FilipTokenizer
from pipeline.errors import UserError
from pipeline.schema import BACK_TRANSLATION_COLUMNS

BACK_TRANSLATION_KEYS = BACK_TRANSLATION_COLUMNS  # the pipeline's back-translated captions
# Image fields of a sample, in the order a sample with several is read: webdataset's and
# open_clip's `jpg;jpeg;png;webp` (the pipeline writes download.encode_format's extension).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
# A resampled stream never runs out of shards, so unreadable shards would be retried forever: a
# worker stops after opening this many shards in a row without one image sample. Far above what
# a few bad shards in a good corpus reach (even half bad: odds 2**-32 per shard).
MAX_SHARDS_WITHOUT_SAMPLE = 32
# Likewise for shards that read but hold only images that do not decode.
MAX_UNDECODABLE_IN_A_ROW = 10_000
STATE_FORMAT = 2  # of a worker's saved stream state; 1 (a raw sample count) is not resumable
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
    """Shard paths from a list, a folder (all *.tar), a glob or a brace pattern `{00000..00009}`.
    Object-store URLs (`s3://bucket/corpus/shards`) take the same forms and stay URLs."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    if is_object_url(spec):
        return _expand_object_shards(spec)
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


def _expand_object_shards(spec: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    if "{" in path:
        import braceexpand

        found = [fs.unstrip_protocol(p) for p in braceexpand.braceexpand(path)]
    elif any(ch in path for ch in "*?["):
        found = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]
    elif fs.isdir(path):
        found = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path.rstrip("/") + "/*.tar"))]
    else:
        found = [spec] if fs.exists(path) else []
    if not found:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return found


def shard_sibling(shard: str, name: str) -> str:
    """The file `name` in the folder of `shard` (a local path or an object-store URL)."""
    return f"{shard.rsplit('/', 1)[0]}/{name}" if is_object_url(shard) else str(Path(shard).parent / name)


def pick_caption(sample: dict[str, Any], rng: random.Random) -> str:
    """The original caption or one of its back-translations, uniformly among the non-empty ones.

    A degenerate back-translation is stored as null (pipeline/stages/backtranslate.py), so it is
    never drawn, and the others share its draws equally.
    """
    candidates = [sample["txt"].decode("utf-8", "replace")] if "txt" in sample else []
    if "json" in sample:
        meta = json.loads(sample["json"])
        candidates += [meta.get(k) for k in BACK_TRANSLATION_KEYS]
    candidates = [c for c in candidates if isinstance(c, str) and c.strip()]
    if not candidates:
        raise ValueError(f"sample {sample.get('__key__')} has no caption")
    return rng.choice(candidates)


def image_field(sample: dict[str, Any]) -> str | None:
    """The sample's first field among IMAGE_FIELDS, or None when it holds no image."""
    return next((field for field in IMAGE_FIELDS if field in sample), None)


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
        """A shard read failed: remember the error, log it; the caller goes on with the next shard."""
        self.last_error = f"{type(error).__name__}: {_one_line(error)}"
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


def stream_layout(shards: list[str], num_workers: int, shuffle_buffer: int, resampled: bool,
                  world_size: int = 1) -> dict[str, Any]:
    """What a saved stream state depends on: it continues only a stream of the same layout."""
    names = "\n".join(Path(s).name for s in shards)  # names only: the corpus may move
    return {"format": STATE_FORMAT, "workers": max(1, num_workers), "world_size": world_size,
            "shuffle_buffer": max(1, shuffle_buffer), "resampled": resampled, "shards": len(shards),
            "shard_names_crc32": zlib.crc32(names.encode())}


class _WorkerStream:
    """One logical worker's raw samples through the shuffle buffer, with the state that continues it.

    The buffer holds `shuffle_buffer` samples; each new one takes a slot drawn from its arrival
    index and pushes the slot's sample out; when the shards run out the rest leaves in a seeded
    order. `state()` names every buffered sample by (shard index, sample index, byte offset), so
    resuming reads those few samples, not the stream up to them.
    """

    def __init__(self, ds: "ShardDataset", worker: int, num_workers: int, state: dict[str, Any] | None) -> None:
        self.ds, self.worker = ds, worker
        self.order = None if ds.resampled else ds.worker_shards(worker, num_workers)
        self.layout = stream_layout(ds.shards, num_workers, ds.shuffle_buffer, ds.resampled, ds.world_size)
        state = state or {}
        # Reading continues at sample `member` (its first header at byte `offset`) of the `shard`-th shard.
        self.shard, self.member = int(state.get("shard", 0)), int(state.get("member", 0))
        self.offset = int(state.get("offset", 0))
        self.arrivals = int(state.get("arrivals", 0))
        self.done = bool(state.get("done", False))  # shards exhausted, buffer draining in `refs` order
        self.refs: list[tuple[int, int, int]] = [(int(n), int(i), int(o)) for n, i, o in state.get("buffer", [])]
        self.drained = 0
        self.tries = _ShardTries(ds.max_shards_without_sample)

    def url(self, n: int) -> str | None:
        """The worker's `n`-th shard (None past the last)."""
        if self.order is None:  # sampled with replacement, each draw its own seed: O(1) to any n
            ds = self.ds
            return ds.shards[_mix(ds.seed, ds.epoch, ds.rank, self.worker, 1, n) % len(ds.shards)]
        return self.order[n] if n < len(self.order) else None

    def state(self) -> dict[str, Any]:
        refs = self.refs[self.drained:] if self.done else self.refs
        return {"layout": self.layout, "shard": self.shard, "member": self.member, "offset": self.offset,
                "arrivals": self.arrivals, "done": self.done, "buffer": [list(ref) for ref in refs]}

    def _read(self) -> Iterator[tuple[tuple[int, int, int], int, dict[str, Any]]]:
        """(ref, offset after it, sample) of each image sample from where reading continues."""
        n, start, offset = self.shard, self.member, self.offset
        while (url := self.url(n)) is not None:
            self.tries.next_shard(url)  # raises once too many shards in a row gave nothing
            try:
                for index, at, after, sample in iter_shard_samples(url, start=start, offset=offset):
                    if image_field(sample) is not None:
                        self.tries.without_sample = 0
                        yield (n, index, at), after, sample
            except Exception as error:  # an unreadable or truncated shard: go on with the next
                self.tries.handler(error)
            n, start, offset = n + 1, 0, 0

    def _load(self, refs: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
        """The samples of a saved buffer, each read at its offset (nothing else is read)."""
        wanted: dict[int, dict[int, int]] = defaultdict(dict)
        for n, index, offset in refs:
            wanted[n][index] = offset
        found: dict[tuple[int, int], dict[str, Any]] = {}
        for n in sorted(wanted):
            url = self.url(n) or f"shard #{n} (past the last)"
            try:
                found.update(((n, i), sample) for i, sample in fetch_shard_samples(url, wanted[n]).items())
            except Exception as error:
                raise ShardReadError(f"cannot resume the data stream: {url}: {type(error).__name__}: "
                                     f"{_one_line(error)}") from None
            if any((n, i) not in found for i in wanted[n]):
                raise ShardReadError(f"cannot resume the data stream: {url} lacks samples that the "
                                     f"checkpoint names (did the shards change since it was written?)")
        return [found[n, index] for n, index, _ in refs]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.ds
        size = max(1, ds.shuffle_buffer)
        buffer = self._load(self.refs)
        if not self.done:
            for ref, after, sample in self._read():
                self.shard, self.member, self.offset = ref[0], ref[1] + 1, after
                self.arrivals += 1
                if size == 1:  # no shuffle
                    yield sample
                    continue
                if len(buffer) < size:
                    buffer.append(sample)
                    self.refs.append(ref)
                    continue
                slot = _mix(ds.seed, ds.epoch, ds.rank, self.worker, 3, self.arrivals) % size
                buffer[slot], sample = sample, buffer[slot]
                self.refs[slot] = ref
                yield sample
            order = list(range(len(buffer)))
            random.Random(_mix(ds.seed, ds.epoch, ds.rank, self.worker, 4)).shuffle(order)
            buffer, self.refs = [buffer[i] for i in order], [self.refs[i] for i in order]
            self.done = True
        for self.drained, sample in enumerate(buffer, start=1):
            yield sample


class ShardDataset(IterableDataset):
    """Batches of (images, token ids, mask) streamed from tar shards, split by rank and worker.

    Each batch carries `resume_state`, its worker's state after it; `resume[w]` = that state of
    logical worker `w` continues it there (see `_WorkerStream`) without reading what it consumed.
    `worker_offset` maps DataLoader worker k to logical worker (k + offset) % num_workers, so a
    resumed DataLoader, which always starts at worker 0, continues the uninterrupted order.
    """

    def __init__(self, shards: list[str], tokenizer: FilipTokenizer, batch_size: int,
                 image_transform: Callable[[Any], torch.Tensor], *, seed: int = 0, epoch: int = 0,
                 resampled: bool = False, shuffle_buffer: int = 1000, rank: int = 0,
                 world_size: int = 1, resume: dict[int, dict[str, Any]] | None = None,
                 worker_offset: int = 0, max_shards_without_sample: int = MAX_SHARDS_WITHOUT_SAMPLE,
                 max_undecodable_in_a_row: int = MAX_UNDECODABLE_IN_A_ROW) -> None:
        super().__init__()
        self.shards, self.tokenizer, self.batch_size = list(shards), tokenizer, batch_size
        self.image_transform = image_transform
        self.seed, self.epoch, self.resampled = seed, epoch, resampled
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.resume = {int(k): v for k, v in (resume or {}).items()}
        for worker, state in self.resume.items():
            if not isinstance(state, dict) or state.get("layout", {}).get("format") != STATE_FORMAT:
                raise ValueError(f"resume state of worker {worker} is not of format {STATE_FORMAT}")
        self.worker_offset = worker_offset
        self.max_shards_without_sample = max_shards_without_sample
        self.max_undecodable_in_a_row = max_undecodable_in_a_row

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.worker_offset) % info.num_workers, info.num_workers

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        """This rank's and worker's shards of the epoch, in order (without resampling)."""
        order = list(self.shards)
        random.Random(_mix(self.seed, self.epoch, 2)).shuffle(order)
        mine = order[self.rank::self.world_size][worker::num_workers]
        if not mine:
            logger.warning("rank %d worker %d has no shard (%d shards for %d ranks x %d workers)",
                           self.rank, worker, len(order), self.world_size, num_workers)
        return mine

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from PIL import Image

        worker, num_workers = self._worker()
        state = self.resume.get(worker)
        if state is not None and state["layout"] != stream_layout(
                self.shards, num_workers, self.shuffle_buffer, self.resampled, self.world_size):
            raise ValueError(f"resume state of worker {worker} was saved for another data layout: "
                             f"{state['layout']}")
        position, batch_index = (int(state["position"]), int(state["batch_index"])) if state else (0, 0)
        stream = _WorkerStream(self, worker, num_workers, state)
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        undecodable = 0
        for sample in stream:
            sample_seed = _mix(self.seed, self.epoch, self.rank, worker, position)
            position += 1
            try:
                image = Image.open(io.BytesIO(sample[image_field(sample)])).convert("RGB")
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
                       "position": position,
                       "resume_state": {**stream.state(), "position": position, "batch_index": batch_index + 1}}
                batch_index += 1
                images, captions, keys = [], [], []
        # A partial last batch is dropped: every step sees the same global batch size.


def make_loader(dataset: ShardDataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False)
