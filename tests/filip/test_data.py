"""Streaming shards: batch layout, rank split, caption choice, exact resume with workers."""
from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

import filip.data
from filip.data import (MAX_SHARDS_WITHOUT_SAMPLE, ShardDataset, ShardReadError, eval_transform,
                        expand_shards, make_loader, pick_caption, train_transform)
from filip.shard_reader import fetch_shard_samples, iter_shard_samples
from filip.tokenizer import FilipTokenizer
from filip.trainer import DataPosition


def dataset(shards: list[str], **kwargs: Any) -> ShardDataset:
    tokenizer = FilipTokenizer.load(kwargs.pop("tokenizer", Path(shards[0]).parent / "tokenizer.model"))
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


def test_null_back_translation_is_never_drawn_and_the_others_share_its_draws() -> None:
    # As the back-translation stage writes a degenerate one: null, with its reason.
    sample = {"txt": b"original", "json": json.dumps(
        {"caption_bt_de": None, "caption_bt_de_reason": "degenerate",
         "caption_bt_ru": "russian round trip", "caption_bt_ru_reason": None}).encode()}
    rng = random.Random(0)
    counts: dict[str, int] = {}
    for _ in range(4000):
        caption = pick_caption(sample, rng)
        counts[caption] = counts.get(caption, 0) + 1
    assert set(counts) == {"original", "russian round trip"}
    assert all(1850 < n < 2150 for n in counts.values()), counts  # 1/2 each, not 2/3 for the original
    blank = {"txt": b"  ", "json": json.dumps({"caption_bt_de": "", "caption_bt_ru": "a dog"}).encode()}
    assert {pick_caption(blank, rng) for _ in range(20)} == {"a dog"}
    with pytest.raises(ValueError, match="has no caption"):
        pick_caption({"__key__": "k", "txt": b"", "json": b'{"caption_bt_de": null}'}, rng)


def test_resume_with_two_workers_continues_the_same_stream(flickr_shards: list[str]) -> None:
    full = list(make_loader(dataset(flickr_shards), num_workers=2))
    assert len(full) == 20
    consumed = 7  # an odd count: the resumed loader must start at the second worker
    position = DataPosition()
    for batch in full[:consumed]:
        position.workers[batch["worker"]] = batch["resume_state"]
        position.next_worker = (batch["worker"] + 1) % 2
    state = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
    resumed = list(make_loader(dataset(flickr_shards, resume=state.workers,
                                       worker_offset=state.next_worker), num_workers=2))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[consumed:]]
    for a, b in zip(resumed, full[consumed:]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["ids"], b["ids"])


def assert_same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["ids"], b["ids"])
        assert a["resume_state"] == b["resume_state"]


def test_resume_in_one_worker_at_any_point_of_the_epoch(flickr_shards: list[str]) -> None:
    full = list(dataset(flickr_shards))
    assert len(full) == 20 and full[-1]["resume_state"]["done"]
    # 1 and 5: the buffer is being pushed through; 17 and 18: the shards are out, the buffer drains.
    for consumed in (1, 5, 17, 18):
        state = json.loads(json.dumps(full[consumed - 1]["resume_state"]))  # as a checkpoint keeps it
        assert_same_batches(list(dataset(flickr_shards, resume={0: state})), full[consumed:])


def test_resume_of_resampled_shards(flickr_shards: list[str]) -> None:
    straight = list(islice(dataset(flickr_shards, resampled=True), 40))  # 800 samples: shards revisited
    state = straight[29]["resume_state"]
    # 600 samples out, 50 in the buffer: the 50th sample of the 7th shard drawn came in last.
    assert (state["arrivals"], state["shard"], state["member"]) == (650, 6, 50)
    resumed = list(islice(dataset(flickr_shards, resampled=True, resume={0: state}), 10))
    assert_same_batches(resumed, straight[30:])


def test_resume_reads_as_few_samples_late_as_early(flickr_shards: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reads = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        for item in iter_shard_samples(*args, **kwargs):
            reads[-1] += 1
            yield item

    def fetched(url: str, wanted: dict[int, int]) -> dict[int, dict[str, Any]]:
        found = fetch_shard_samples(url, wanted)
        reads[-1] += len(found)
        return found

    monkeypatch.setattr(filip.data, "iter_shard_samples", counted)
    monkeypatch.setattr(filip.data, "fetch_shard_samples", fetched)
    endless = list(islice(dataset(flickr_shards, resampled=True), 60))
    for consumed in (2, 59):  # 40 and 1,180 samples in
        reads.append(0)
        next(iter(dataset(flickr_shards, resampled=True, resume={0: endless[consumed - 1]["resume_state"]})))
    # The 50 buffered samples, then the 20 new ones of the first batch (each sample read once).
    assert reads[1:] == [70, 70]


def test_resume_state_of_another_layout_or_format_is_refused(flickr_shards: list[str]) -> None:
    state = next(iter(dataset(flickr_shards)))["resume_state"]
    with pytest.raises(ValueError, match="another data layout"):
        next(iter(dataset(flickr_shards, shuffle_buffer=10, resume={0: state})))
    with pytest.raises(ValueError, match="is not of format 2"):
        dataset(flickr_shards, resume={0: (20, 1)})


def test_shard_reader_starts_at_an_index_or_offset_and_fetches_by_offset(flickr_shards: list[str]) -> None:
    everything = list(iter_shard_samples(flickr_shards[1]))
    assert [i for i, *_ in everything] == list(range(100))
    assert {"__key__", "__url__", "jpg", "txt", "json"} == set(everything[0][3])
    assert everything[0][1] == 0 and all(a[2] == b[1] for a, b in zip(everything, everything[1:]))
    assert list(iter_shard_samples(flickr_shards[1], start=97)) == everything[97:]
    index, offset = 42, everything[41][2]  # sample 41 ends where 42 starts
    assert list(iter_shard_samples(flickr_shards[1], start=index, offset=offset)) == everything[42:]
    wanted = {i: everything[i][1] for i in (99, 3, 42)}
    assert fetch_shard_samples(flickr_shards[1], wanted) == {i: everything[i][3] for i in (3, 42, 99)}
    with pytest.raises(tarfile.ReadError):  # an offset that is not a header
        fetch_shard_samples(flickr_shards[1], {5: everything[5][1] + 100})


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


def garbage_shards(folder: Path, count: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    rng = random.Random(0)
    paths = [folder / f"{i:05d}.tar" for i in range(count)]
    for path in paths:
        path.write_bytes(rng.randbytes(3000))
    return [str(p) for p in paths]


def undecodable_shard(path: Path, samples: int) -> str:
    with tarfile.open(path, "w") as tar:
        for index in range(samples):
            for name, payload in ((f"{index:04d}.jpg", b"not a jpeg"), (f"{index:04d}.txt", b"a dog")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_resampled_unreadable_shards_stop_after_the_bound(flickr_shards: list[str], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    bad = garbage_shards(tmp_path / "bad", 3)
    endless = dataset(bad, tokenizer=Path(flickr_shards[0]).parent / "tokenizer.model", resampled=True)
    with caplog.at_level(logging.WARNING, logger="filip.data"), pytest.raises(ShardReadError) as caught:
        next(iter(endless))
    message = str(caught.value)
    assert message.startswith(f"no sample could be read from {MAX_SHARDS_WITHOUT_SAMPLE} shards in a row "
                              f"under {tmp_path / 'bad'} (last {tmp_path / 'bad'}/0000")
    assert message.endswith(": ReadError: invalid header); are they the pipeline's WebDataset .tar shards?")
    opened = [r for r in caplog.records if r.getMessage().startswith("skipping unreadable shard data")]
    assert len(opened) == MAX_SHARDS_WITHOUT_SAMPLE


def test_worker_error_reaches_the_main_process_as_one_line(flickr_shards: list[str], tmp_path: Path) -> None:
    bad = garbage_shards(tmp_path / "bad", 2)
    endless = dataset(bad, tokenizer=Path(flickr_shards[0]).parent / "tokenizer.model", resampled=True,
                      max_shards_without_sample=4)
    with pytest.raises(ShardReadError) as caught:
        next(iter(make_loader(endless, num_workers=2)))
    folder = tmp_path / "bad"
    assert str(caught.value).startswith(f"no sample could be read from 4 shards in a row under {folder} ")
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_few_bad_shards_among_good_ones_are_skipped(flickr_shards: list[str], tmp_path: Path) -> None:
    bad = garbage_shards(tmp_path / "bad", 2)
    mixed = dataset([*flickr_shards, *bad], tokenizer=Path(flickr_shards[0]).parent / "tokenizer.model",
                    max_shards_without_sample=3)
    assert sum(len(b["keys"]) for b in mixed) == 400  # both bad shards skipped, every good sample read
    resampled = dataset([flickr_shards[0], *bad], tokenizer=Path(flickr_shards[0]).parent / "tokenizer.model",
                        resampled=True)
    stream = iter(resampled)
    assert [len(next(stream)["keys"]) for _ in range(30)] == [20] * 30  # 600 samples: 6+ shard visits


def test_shards_of_undecodable_images_stop_too(flickr_shards: list[str], tmp_path: Path) -> None:
    shard = undecodable_shard(tmp_path / "00000.tar", 10)
    endless = dataset([shard], tokenizer=Path(flickr_shards[0]).parent / "tokenizer.model", resampled=True,
                      max_undecodable_in_a_row=25)
    with pytest.raises(ShardReadError) as caught:
        next(iter(endless))
    pattern = (rf"25 samples in a row did not decode, the last 000\d in {re.escape(shard)}: "
               rf"UnidentifiedImageError: cannot identify image file <_io\.BytesIO object at 0x[0-9a-f]+>")
    assert re.fullmatch(pattern, str(caught.value)), str(caught.value)


def reencoded_shard(source: str, path: Path, formats: list[str]) -> dict[str, str]:
    """Copy `source`'s samples into `path`, sample i's image re-encoded as `formats[i % len]` (a real
    image file under that extension), dropping samples past the list; returns {key: extension}."""
    from PIL import Image

    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
    written: dict[str, str] = {}
    with tarfile.open(path, "w") as tar:
        for index, _, _, sample in islice(iter_shard_samples(source), len(formats)):
            ext = formats[index]
            buffer = io.BytesIO()
            Image.open(io.BytesIO(sample["jpg"])).save(buffer, format=pil_format[ext], lossless=True)
            for name, payload in ((f"{sample['__key__']}.{ext}", buffer.getvalue()),
                                  (f"{sample['__key__']}.txt", sample["txt"]),
                                  (f"{sample['__key__']}.json", sample["json"])):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            written[sample["__key__"]] = ext
    return written


def test_jpg_jpeg_png_and_webp_images_are_all_read(flickr_shards: list[str], tmp_path: Path) -> None:
    from PIL import Image

    formats = ["jpg", "jpeg", "png", "webp"] * 5
    written = reencoded_shard(flickr_shards[0], tmp_path / "00000.tar", formats)
    assert sorted(written.values()) == sorted(formats)
    transform = eval_transform(64)
    reader = ShardDataset([str(tmp_path / "00000.tar")],
                          FilipTokenizer.load(Path(flickr_shards[0]).parent / "tokenizer.model"), 20,
                          transform, shuffle_buffer=1)
    batches = list(reader)
    assert len(batches) == 1 and sorted(batches[0]["keys"]) == sorted(written)
    # png and lossless webp hold the source pixels exactly: the tensors are those of the jpg.
    originals = {sample["__key__"]: sample["jpg"] for _, _, _, sample in iter_shard_samples(flickr_shards[0])}
    for key, image in zip(batches[0]["keys"], batches[0]["images"]):
        if written[key] in ("png", "webp"):
            assert torch.equal(image, transform(Image.open(io.BytesIO(originals[key])))), key


def test_a_png_corpus_trains(flickr_shards: list[str], tmp_path: Path, tiny_config_writer: Any) -> None:
    from filip.trainer import main

    corpus = tmp_path / "shards"
    corpus.mkdir()
    for shard in flickr_shards[:2]:
        reencoded_shard(shard, corpus / Path(shard).name, ["png"] * 40)
    (corpus / "tokenizer.model").write_bytes((Path(flickr_shards[0]).parent / "tokenizer.model").read_bytes())
    config = tiny_config_writer(corpus, tmp_path / "run", tmp_path / "train.yaml", max_steps=4, batch_size=16)
    assert main([str(config), "--set", "run.log_every=2"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4]
    assert all(m["loss"] == m["loss"] and 0 < m["loss"] < 100 for m in logged), logged
