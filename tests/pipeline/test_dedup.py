"""Global dedup on Ray over many parquet shards: copies planted across shards are found, and the
result equals the single-machine search."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from filters.caption import normalize_caption
from filters.dedup import DedupConfig, find_duplicates, plan_tables
from filters.image import inspect_image
from pipeline.dedup import find_duplicates_in_driver, find_duplicates_ray

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


def test_ray_dedup_finds_copies_across_shards_like_single_machine(ray_session, shards) -> None:
    files, rows, planted, last_shard_original = shards
    config = DedupConfig()
    # Small groups so the shuffle spreads records over several map_groups calls.
    table, counters = find_duplicates_ray(files, config, records_per_group=2000)
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


def test_driver_search_equals_the_ray_shuffle(ray_session, shards) -> None:
    files = shards[0]
    config = DedupConfig()
    shuffled, shuffled_counters = find_duplicates_ray(files, config, records_per_group=2000)
    driver, driver_counters = find_duplicates_in_driver(files, config)
    assert sorted(driver.to_pylist(), key=lambda r: r["key"]) == sorted(shuffled.to_pylist(), key=lambda r: r["key"])
    assert driver_counters == shuffled_counters
    assert driver_counters["duplicates"] > 0


def test_tables_in_waves_give_the_same_result(ray_session, shards) -> None:
    files = shards[0]
    config = DedupConfig()
    whole, whole_counters = find_duplicates_ray(files, config, records_per_group=2000)
    # The tables (7 at this size) in waves of 3: three shuffles, each holding part of the records.
    assert len(plan_tables(config.hamming_threshold, whole.num_rows)) > 3
    waves, wave_counters = find_duplicates_ray(files, config, records_per_group=2000, tables_per_shuffle=3)
    assert sorted(waves.to_pylist(), key=lambda r: r["key"]) == sorted(whole.to_pylist(), key=lambda r: r["key"])
    assert wave_counters == whole_counters
