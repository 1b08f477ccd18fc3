"""Global dedup over many parquet shards, distributed on Ray and in the driver: copies planted
across shards are found, and both searches return exactly the same rows and counters."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from filters.caption import normalize_caption
from filters.dedup import DedupConfig, find_duplicates
from filters.image import inspect_image
from pipeline.stages.dedup import DedupStageConfig
from pipeline.dedup import find_duplicates_distributed, find_duplicates_in_driver
from pipeline.stages.dedup import CLUSTERS, find_clusters
from pipeline.storage import Storage

N_PHOTOS = 120
N_SHARDS = 10


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(flickr_dir, tmp_path_factory):
    """10 shards of Flickr rows; copies of shard-0 photos sit in the last shard and vice versa."""
    paths = sorted((flickr_dir / "images").glob("*.jpg"))[:N_PHOTOS]
    rows = []
    for index, path in enumerate(paths):
        info = inspect_image(path.read_bytes())
        rows.append({"shard": index % N_SHARDS, "key": f"{index % N_SHARDS:04d}{index:05d}",
                     "sha256": info.sha256, "phash": info.phash, "original_width": info.width,
                     "original_height": info.height, "caption": f"photo number {index}", "drop_reason": None})
    planted = {}
    for number, index in enumerate(range(0, 40, N_SHARDS)):  # photos of shard 0
        with Image.open(paths[index]) as image:
            bodies = {"exact": paths[index].read_bytes(), "recompressed": _jpeg(image, 50),
                      "resized": _jpeg(image.resize((image.width // 2, image.height // 2)), 90)}
        for variant, body in bodies.items():
            info = inspect_image(body)
            key = f"{N_SHARDS - 1:04d}9{number}{len(planted):03d}"
            caption = f"Photo number {index}." if variant == "resized" else "another caption"
            rows.append({"shard": N_SHARDS - 1, "key": key, "sha256": info.sha256, "phash": info.phash,
                         "original_width": info.width, "original_height": info.height,
                         "caption": caption, "drop_reason": None})
            planted[key] = (rows[index]["key"], variant)
    # A copy of a last-shard photo, larger than the original: it becomes the representative.
    source = rows[N_SHARDS - 1]
    rows.append({**source, "shard": 0, "key": "000099999", "original_width": 4000, "original_height": 3000})
    # A row dropped earlier never takes part, even though it is an exact copy.
    rows.append({**rows[0], "shard": 3, "key": "000399998", "drop_reason": "too_small"})
    folder = tmp_path_factory.mktemp("dedup_shards")
    files = []
    for shard in range(N_SHARDS):
        table = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "shard"}
                                      for row in rows if row["shard"] == shard])
        table = table.cast(table.schema.set(table.schema.get_field_index("drop_reason"),
                                            pa.field("drop_reason", pa.string())))
        files.append(str(folder / f"{shard:05d}.parquet"))
        pq.write_table(table, files[-1])
    return files, rows, planted, source["key"]


def test_distributed_dedup_finds_copies_across_shards_like_single_machine(ray_session, shards) -> None:
    files, rows, planted, last_shard_original = shards
    config = DedupConfig()
    # Small groups and parts: 5 read tasks, 2 hash ranges and 2 sha parts, 2 search tasks.
    table, counters = find_duplicates_distributed(files, config, tasks=2, rows_per_group=20, rows_per_part=50)
    result = {row["key"]: row for row in table.to_pylist()}
    kept_rows = [row for row in rows if row["drop_reason"] is None]
    assert set(result) == {row["key"] for row in kept_rows}
    for key, (original, variant) in planted.items():
        assert result[key]["duplicate_of"] == original, (key, variant)
        assert result[key]["dup_reason"] == {"exact": "exact_duplicate", "recompressed": "near_duplicate",
                                             "resized": "duplicate_caption_and_image"}[variant]
    assert result[last_shard_original]["duplicate_of"] == "000099999"
    assert result[last_shard_original]["dup_reason"] == "duplicate_caption_and_image"
    assert counters["duplicates"] == len(planted) + 1
    assert counters["clusters"] == N_PHOTOS

    keys = np.array([row["key"] for row in kept_rows])
    single = find_duplicates(
        keys, np.array([row["sha256"] for row in kept_rows], dtype=object),
        np.array([row["phash"] for row in kept_rows], np.int64),
        np.array([row["original_width"] * row["original_height"] for row in kept_rows], np.int64),
        config, np.array([normalize_caption(row["caption"]) for row in kept_rows], dtype=object))
    for index, key in enumerate(keys):
        assert result[key]["duplicate_of"] == single.duplicate_of[index]
        assert result[key]["cluster_id"] == single.cluster_id[index]
        assert result[key]["cluster_size"] == single.cluster_size[index]
        assert result[key]["dup_reason"] == single.dup_reason[index]
    assert {name: counters[name] for name in single.counters} == single.counters


def test_driver_search_equals_the_distributed_search(ray_session, shards) -> None:
    files = shards[0]
    distributed, distributed_counters = find_duplicates_distributed(files, DedupConfig(), tasks=3, rows_per_group=30)
    driver, driver_counters = find_duplicates_in_driver(files, DedupConfig())
    assert driver.equals(distributed)  # same rows, same order
    assert driver_counters == distributed_counters
    assert driver_counters["duplicates"] > 0


def _flip(values: np.ndarray, rng: np.random.Generator, most: int) -> np.ndarray:
    """Each hash with 0..most random distinct bits flipped."""
    masks = [sum(1 << int(bit) for bit in rng.choice(64, size=rng.integers(0, most + 1), replace=False))
             for _ in values]
    return (values.view(np.uint64) ^ np.array(masks, np.uint64)).view(np.int64)


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> list[str]:
    """3,000 rows in 7 shards: near copies (0..6 bits) and exact copies of earlier rows across
    shards, equal pHashes with different sha256, one flat-image bucket of 40 hashes (over the cap
    of 10 below), repeated captions, rows dropped earlier, and one shard whose rows all dropped."""
    rng = np.random.default_rng(11)
    n = 3000
    phash = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n, dtype=np.int64)
    sha = np.array([f"{value:064x}" for value in rng.integers(0, 2**62, size=n)], dtype=object)
    copies = rng.choice(np.arange(500, n), size=300, replace=False)
    sources = (rng.random(300) * (copies - 400)).astype(np.int64)
    phash[copies[:200]] = _flip(phash[sources[:200]], rng, 6)
    phash[copies[200:250]], sha[copies[200:250]] = phash[sources[200:250]], sha[sources[200:250]]
    phash[copies[250:]] = phash[sources[250:]]  # same pHash, another body
    flat = np.arange(1000, 1040)
    phash[flat] = np.int64(0x5A5A_0000_0000_0000) | rng.choice(64, size=40, replace=False).astype(np.int64)
    captions = np.array([f"a photo number {row}" for row in range(n)], dtype=object)
    captions[copies[::3]] = [f"A Photo number {row}." for row in sources[::3]]  # the same once normalised
    drop = np.where(rng.random(n) < 0.05, "too_small", None)
    drop[2400:2600] = "too_small"
    folder = tmp_path_factory.mktemp("synthetic_dedup")
    bounds = [0, 400, 900, 1500, 2400, 2600, 2800, n]
    files = []
    for shard, (begin, end) in enumerate(itertools.pairwise(bounds)):
        rows = slice(begin, end)
        table = pa.table({
            "key": pa.array([f"{shard:05d}{index:04d}" for index in range(end - begin)]),
            "sha256": pa.array(sha[rows].tolist(), pa.string()), "phash": pa.array(phash[rows]),
            "original_width": pa.array(rng.integers(100, 400, size=end - begin)),
            "original_height": pa.array(rng.integers(100, 400, size=end - begin)),
            "caption": pa.array(captions[rows].tolist(), pa.string()),
            "drop_reason": pa.array(drop[rows].tolist(), pa.string())})
        files.append(str(folder / f"{shard:05d}.parquet"))
        pq.write_table(table, files[-1])
    return files


@pytest.mark.parametrize("tasks, rows_per_group, rows_per_part", [(1, 10_000, 10_000), (2, 500, 700), (5, 300, 400)])
def test_distributed_search_equals_the_driver_on_planted_and_capped_rows(
        ray_session, synthetic_shards, tasks: int, rows_per_group: int, rows_per_part: int) -> None:
    config = DedupConfig(bucket_cap=10)
    driver, driver_counters = find_duplicates_in_driver(synthetic_shards, config)
    distributed, counters = find_duplicates_distributed(synthetic_shards, config, tasks=tasks,
                                                       rows_per_group=rows_per_group, rows_per_part=rows_per_part)
    assert distributed.equals(driver)
    assert counters == driver_counters
    assert counters["capped_buckets"] > 0 and counters["capped_items"] > 0
    reasons = pc_value_counts(distributed["dup_reason"])
    assert set(reasons) == {None, "near_duplicate", "exact_duplicate", "duplicate_caption_and_image"}
    assert counters["rows"] == driver.num_rows < 3000 - 200
    assert counters["duplicates"] == sum(n for reason, n in reasons.items() if reason is not None)


def pc_value_counts(column: pa.ChunkedArray) -> dict:
    return {item["values"]: item["counts"] for item in column.value_counts().to_pylist()}


def test_find_clusters_writes_each_shard_from_the_tasks(ray_session, synthetic_shards, tmp_path) -> None:
    storage = Storage(str(tmp_path / "out"))
    shards = [path.rsplit("/", 1)[-1].removesuffix(".parquet") for path in synthetic_shards]
    for shard, path in zip(shards, synthetic_shards):
        storage.write_parquet(f"inspect/{shard}.parquet", pq.read_table(path))
    # The shard whose rows all dropped is not searched, as the build passes it.
    with_rows = [shard for shard in shards if shard != "00004"]
    config = DedupStageConfig(bucket_cap=10, single_machine_max_rows=0)
    counters = find_clusters(storage, "inspect", shards, config, with_rows)
    driver, driver_counters = find_duplicates_in_driver(synthetic_shards, config)
    assert counters["in_driver"] == 0 and counters["seconds"] > 0
    assert {name: counters[name] for name in driver_counters} == driver_counters
    written = [storage.read_parquet(f"{CLUSTERS}/{shard}.parquet") for shard in shards]
    assert [table.num_rows for table in written][4] == 0
    assert pa.concat_tables(written).equals(driver)
    assert storage.exists(f"{CLUSTERS}/.done")
