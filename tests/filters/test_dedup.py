"""Multi-index hashing, union-find, representatives, and dedup quality on real Flickr photos."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from filters.caption import normalize_caption
from filters.dedup import (DedupConfig, UnionFind, choose_representatives, exact_pairs, find_duplicates,
                           hamming, near_pairs, pairs_in_bucket, plan_tables, sorted_bucket_pairs, table_keys)
from filters.dedup_kernel import partition_bits, table_pairs
from filters.image import inspect_image

RNG_SEED = 7


def _random_hashes(count: int, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=count, dtype=np.int64)


def _flip_bits(value: np.int64, bits: list[int]) -> np.int64:
    mask = np.uint64(sum(1 << bit for bit in bits))
    return (np.array([value]).view(np.uint64) ^ mask).view(np.int64)[0]


@pytest.mark.parametrize("threshold", [0, 2, 4, 6])
def test_every_pair_within_threshold_shares_a_bucket(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    base = _random_hashes(2000, seed=threshold)
    flips = [sorted(rng.choice(64, size=threshold, replace=False).tolist()) for _ in base]
    near = np.array([_flip_bits(value, bits) for value, bits in zip(base, flips)])
    specs = plan_tables(threshold, 10_000_000)
    shared = np.zeros(base.size, bool)
    for spec in specs:
        shared |= table_keys(base, spec) == table_keys(near, spec)
    assert shared.all()
    assert len({spec.blocks for spec in specs}) == len(specs)


def test_plan_keys_grow_with_log2_n_not_the_bucket_size() -> None:
    small, large = plan_tables(6, 1_000), plan_tables(6, 10_000_000)
    assert large[0].key_bits >= 20 and large[0].key_bits > small[0].key_bits
    # Plain k+1 bands would be 7 tables of 9-bit keys at any n.
    assert len(large) > 7
    assert len(plan_tables(6, 10_000_000, max_tables=30)) <= 30


def test_near_pairs_equal_brute_force() -> None:
    hashes = _random_hashes(6000)
    rng = np.random.default_rng(1)
    for source, copy in zip(range(0, 300), range(3000, 3300)):
        hashes[copy] = _flip_bits(hashes[source], rng.choice(64, size=rng.integers(0, 7), replace=False).tolist())
    first, second, counters = near_pairs(hashes, DedupConfig(hamming_threshold=6))
    found = set(zip(np.minimum(first, second).tolist(), np.maximum(first, second).tolist()))
    # Each pair comes back once, from the first table that shares it, though most share several.
    assert len(found) == first.size
    assert counters.verified_pairs > 2 * first.size
    bits = hashes.view(np.uint64)
    distances = np.bitwise_count(bits[:, None] ^ bits[None, :])
    brute = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(distances <= 6, k=1)))}
    assert found == brute
    assert len(brute) >= 300
    assert counters.verified_pairs >= len(brute) and counters.capped_buckets == 0


def test_pairs_in_bucket_verifies_distance_and_chains_equal_hashes() -> None:
    base = np.int64(0x0F0F0F0F0F0F0F0F)
    phashes = np.array([base, _flip_bits(base, [0, 1]), _flip_bits(base, list(range(20))), base], np.int64)
    first, second = pairs_in_bucket(np.array([10, 11, 12, 13]), phashes, threshold=2, cap=100)
    assert {tuple(sorted(pair)) for pair in zip(first.tolist(), second.tolist())} == {(10, 11), (10, 13)}


def test_oversized_buckets_are_capped_and_counted() -> None:
    # 40 distinct hashes that agree on all but the lowest 6 bits: one bucket in every table.
    hashes = np.array([np.int64(0x7A00) | np.int64(low) for low in range(40)], np.int64)
    config = DedupConfig(hamming_threshold=2, bucket_cap=10)
    _, _, counters = near_pairs(hashes, config)
    n_tables = len(plan_tables(2, hashes.size))
    assert counters.capped_buckets >= 1
    assert counters.capped_items == counters.capped_buckets * 30
    assert counters.candidate_pairs <= n_tables * 45


@pytest.mark.parametrize("threshold", [1, 3, 6, 8])
@pytest.mark.parametrize("n_items", [10_000, 1_000_000, 10_000_000, 300_000_000])
def test_every_set_of_threshold_blocks_misses_some_table(threshold: int, n_items: int) -> None:
    # The exactness argument itself, checked exhaustively on the blocks: whichever `threshold`
    # blocks hold the differing bits, some table's key lies wholly outside them.
    specs = plan_tables(threshold, n_items)
    blocks = sorted({block for spec in specs for block in spec.blocks}, reverse=True)
    assert sum(width for _, width in blocks) == 64
    tables = [set(spec.blocks) for spec in specs]
    for dirty in itertools.combinations(blocks, threshold):
        assert any(not (table & set(dirty)) for table in tables), dirty


def test_covering_plans_beat_all_combinations() -> None:
    # 9 blocks choose 3 (Manku et al.) would be 84 tables of 21-22 bits at 1M hashes.
    specs = plan_tables(6, 1_000_000)
    assert len(specs) < 84 and min(spec.key_bits for spec in specs) >= 20


def _numpy_table_pairs(values: np.ndarray, spec, threshold: int, cap: int):
    keys = table_keys(values, spec)
    order = np.lexsort((np.arange(values.size), keys))
    first, second, counters = sorted_bucket_pairs(keys[order], values[order], threshold, cap)
    return {(int(a), int(b)) for a, b in zip(order[first], order[second])}, counters


@pytest.mark.parametrize("cap", [1000, 3])
def test_compiled_table_search_equals_the_numpy_search(cap: int) -> None:
    # Hashes crowded into few buckets (top 40 bits from 300 values), so buckets exceed a cap of 3.
    rng = np.random.default_rng(3)
    crowded = (rng.integers(0, 300, 20_000).astype(np.uint64) << np.uint64(24)) | rng.integers(
        0, 1 << 24, 20_000).astype(np.uint64)
    values = np.unique(np.concatenate((crowded.view(np.int64), _random_hashes(30_000))))
    buffers = [np.empty(values.size, np.uint64) for _ in range(4)]
    for spec in plan_tables(6, values.size)[:6]:
        expected, expected_counters = _numpy_table_pairs(values, spec, 6, cap)
        first, second, found = table_pairs(
            values.view(np.uint64), np.array([shift for shift, _ in spec.blocks], np.uint64),
            np.array([width for _, width in spec.blocks], np.uint64), spec.key_bits,
            partition_bits(values.size, spec.key_bits), 6, cap, *buffers,
            np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.uint64))
        pairs = zip(np.searchsorted(values, first.view(np.int64)).tolist(),
                    np.searchsorted(values, second.view(np.int64)).tolist())
        assert {(min(pair), max(pair)) for pair in pairs} == expected
        assert found.tolist() == [expected_counters.candidate_pairs, expected_counters.verified_pairs,
                                  expected_counters.capped_buckets, expected_counters.capped_items]
    if cap == 3:
        assert expected_counters.capped_buckets > 0


def test_exact_pairs_links_equal_values_past_a_shared_prefix() -> None:
    # Same first 16 hex digits everywhere, so only the whole value separates these.
    prefix = "0123456789abcdef"
    values = np.array([prefix + tail for tail in ["9" * 48, "1" * 48, "9" * 48, "5" * 48, "1" * 48]], dtype=object)
    sets = UnionFind(values.size)
    sets.union(*exact_pairs(values))
    roots = sets.roots()
    assert roots[0] == roots[2] and roots[1] == roots[4]
    assert len({roots[0], roots[1], roots[3]}) == 3
    # Not hex at all: the plain string sort.
    sets = UnionFind(3)
    sets.union(*exact_pairs(np.array(["b", "a", "b"], dtype=object)))
    assert sets.roots().tolist() == [0, 1, 0]


def test_union_find_joins_chains_and_keeps_the_rest_apart() -> None:
    sets = UnionFind(10)
    sets.union(np.array([9, 8, 7, 1]), np.array([8, 7, 6, 2]))
    roots = sets.roots()
    assert roots.tolist() == [0, 1, 1, 3, 4, 5, 6, 6, 6, 6]
    sets.union(np.array([2]), np.array([9]))
    assert len(set(sets.roots()[[1, 2, 6, 7, 8, 9]].tolist())) == 1


def test_representative_is_largest_area_then_smallest_key() -> None:
    roots = np.array([0, 0, 0, 3, 3, 5])
    keys = np.array(["c", "b", "a", "e", "d", "f"])
    area = np.array([100, 200, 200, 50, 50, 1])
    assert choose_representatives(roots, area, keys).tolist() == [2, 2, 2, 4, 4, 5]


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _crop(image: Image.Image, fraction: float) -> bytes:
    width, height = image.size
    left, top = round(width * fraction / 2), round(height * fraction / 2)
    return _jpeg(image.crop((left, top, width - left, height - top)))


# Transformations every copy of which the default threshold must find (bench/dedup_quality.py
# reports the harsher ones: 5% crops, stronger brightening).
TRANSFORMS = {
    "exact": None,
    "resized_half": lambda image: _jpeg(image.resize((image.width // 2, image.height // 2), Image.BICUBIC)),
    "recompressed_q50": lambda image: _jpeg(image, quality=50),
    "cropped_3pct_area": lambda image: _crop(image, 0.015),
    "brightened_1.1": lambda image: _jpeg(ImageEnhance.Brightness(image).enhance(1.1)),
}


@pytest.fixture(scope="module")
def flickr_with_copies(flickr_dir):
    """Every Flickr photo (keys 0xxxx) plus one planted copy per photo and transformation
    (keys 1xxxx..), each transformation applied to a different fifth of the photos."""
    paths = sorted((flickr_dir / "images").glob("*.jpg"))
    keys, sha, phash, area, copy_of = [], [], [], [], []
    for index, path in enumerate(paths):
        data = path.read_bytes()
        info = inspect_image(data)
        keys.append(f"0{index:08d}"), sha.append(info.sha256), phash.append(info.phash)
        area.append(info.width * info.height), copy_of.append(None)
    for number, (name, transform) in enumerate(TRANSFORMS.items()):
        for index in range(number, len(paths), len(TRANSFORMS)):
            data = paths[index].read_bytes()
            if transform is not None:
                with Image.open(io.BytesIO(data)) as image:
                    data = transform(image)
            info = inspect_image(data)
            keys.append(f"{number + 1}{index:08d}"), sha.append(info.sha256), phash.append(info.phash)
            area.append(info.width * info.height), copy_of.append((f"0{index:08d}", name))
    return (np.array(keys), np.array(sha, dtype=object), np.array(phash, np.int64),
            np.array(area, np.int64), copy_of)


def test_every_planted_copy_is_found_and_no_photos_merge(flickr_with_copies) -> None:
    keys, sha, phash, area, copy_of = flickr_with_copies
    result = find_duplicates(keys, sha, phash, area, DedupConfig())
    duplicate_of, reasons = result.duplicate_of, result.dup_reason
    missed = [(keys[i], copy[1]) for i, copy in enumerate(copy_of) if copy and duplicate_of[i] != copy[0]]
    assert missed == []
    originals = [i for i, copy in enumerate(copy_of) if copy is None]
    # No original photo is dropped, and each cluster holds one original: nothing distinct merged.
    assert all(duplicate_of[i] is None for i in originals)
    assert len(set(result.cluster_id[originals].tolist())) == len(originals)
    assert result.cluster_size[originals].max() == 2
    exact = [i for i, copy in enumerate(copy_of) if copy and copy[1] == "exact"]
    assert set(reasons[exact]) == {"exact_duplicate"}
    others = [i for i, copy in enumerate(copy_of) if copy and copy[1] != "exact"]
    assert set(reasons[others]) == {"near_duplicate"}


def test_distinct_flickr_photos_stay_apart(flickr_dir) -> None:
    paths = sorted((flickr_dir / "images").glob("*.jpg"))
    infos = [inspect_image(path.read_bytes()) for path in paths]
    phash = np.array([info.phash for info in infos], np.int64)
    result = find_duplicates(np.array([path.stem for path in paths]), None, phash,
                             np.ones(len(paths), np.int64), DedupConfig())
    assert (result.cluster_size == 1).all()
    # Guard the margin the default was chosen with (closest distinct pair: 12 bits).
    closest = min(int(hamming(phash[i:i + 1], phash[i + 1:]).min()) for i in range(len(phash) - 1))
    assert closest > DedupConfig().hamming_threshold + 2


def test_caption_and_cluster_reason(flickr_dir) -> None:
    path = sorted((flickr_dir / "images").glob("*.jpg"))[0]
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        smaller = _jpeg(image.resize((image.width // 2, image.height // 2)))
    infos = [inspect_image(body) for body in (data, data, smaller, smaller)]
    captions = np.array([normalize_caption(text) for text in
                         ["A dog runs.", "a dog   runs", "a cat", None]], dtype=object)
    result = find_duplicates(np.array(["k0", "k1", "k2", "k3"]), np.array([i.sha256 for i in infos], dtype=object),
                             np.array([i.phash for i in infos], np.int64),
                             np.array([i.width * i.height for i in infos]), DedupConfig(), captions)
    assert result.dup_reason.tolist() == [None, "duplicate_caption_and_image", "near_duplicate", "near_duplicate"]
    assert result.duplicate_of.tolist() == [None, "k0", "k0", "k0"]
    assert result.cluster_size.tolist() == [4, 4, 4, 4]
