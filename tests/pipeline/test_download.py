"""The download stage against a hostile web: every row's exact status and reason, the pixels of
what it stores, and zero connections to an address the policy refuses.

The stage runs as `filip build` runs it (`DownloadStage.run_shard` on an input shard), without Ray:
the stage contract is Ray-free, and the full build tests run it through Ray with the same guard.
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.download import DownloadStage, download_decisions
from pipeline.records import read_tar_images
from pipeline.storage import Storage
from pipeline.testweb import png_declaring, serve_web
from tests.filters.web.test_fetch import CountingListener

QUADRANTS = {"top_left": (255, 0, 0), "top_right": (0, 200, 0), "bottom_left": (0, 0, 255),
             "bottom_right": (255, 255, 255)}


def _upright_pattern(width: int = 64, height: int = 48) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w], pixels[:h, w:] = QUADRANTS["top_left"], QUADRANTS["top_right"]
    pixels[h:, :w], pixels[h:, w:] = QUADRANTS["bottom_left"], QUADRANTS["bottom_right"]
    return Image.fromarray(pixels)


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, flickr_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    photo = sorted((flickr_dir / "images").iterdir())[0].read_bytes()
    (root / "photo.jpg").write_bytes(photo)
    (root / "ünïcode bild.jpg").write_bytes(photo)
    (root / "trailing.jpg").write_bytes(photo + (b"\xff\xd9\xff\xda" + bytes(range(256))) * 400)
    upright = _upright_pattern()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (root / "exif6.jpg").write_bytes(_jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()))
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (32, 1))
    cv2.imwrite(str(root / "grey16.png"), ramp)
    rgb16 = np.zeros((32, 64, 3), np.uint16)
    rgb16[..., 2], rgb16[..., 1] = 65535, 32768  # cv2 writes BGR: red full, green half, blue 0
    cv2.imwrite(str(root / "rgb16.png"), rgb16)
    (root / "grey.jpg").write_bytes(_jpeg(Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1)))))
    (root / "bomb.png").write_bytes(png_declaring(20000, 20000))
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, hostile_root: Path):
    """One download shard over every hostile case; the stage's rows by label, the stored images,
    the server's request log and the refused listener's connection count."""
    listener = CountingListener("127.0.0.2")
    requests: list = []
    try:
        with serve_web(hostile_root, slow_seconds=3.0, requests=requests) as base:
            port = base.rsplit(":", 1)[1]
            refused = f"http://127.0.0.2:{listener.port}/photo.jpg"
            named = f"http://images.example:{port}"
            rows = {
                # the guard: refused wherever the address comes from
                "refused direct": (refused, "failed", "blocked_address"),
                "refused after redirect": (f"{base}/redirect?to={refused}", "failed", "blocked_address"),
                "refused by name": (f"http://evil.example:{listener.port}/a.jpg", "failed", "blocked_address"),
                "refused name with an allowed address too":
                    (f"http://mixed.example:{listener.port}/a.jpg", "failed", "blocked_address"),
                "refused percent-encoded": (f"http://%31%32%37.0.0.2:{listener.port}/", "failed", "blocked_address"),
                "refused decimal": (f"http://2130706434:{listener.port}/", "failed", "blocked_address"),
                "refused IPv4-mapped": (f"http://[::ffff:127.0.0.2]:{listener.port}/", "failed", "blocked_address"),
                "refused metadata name": (f"http://metadata.google.internal:{port}/img/photo.jpg",
                                          "failed", "blocked_address"),
                "public name redirected to refused": (f"{named}/redirect?to={refused}", "failed", "blocked_address"),
                # bounds
                "drip": (f"{base}/drip/100000", "failed", "deadline_exceeded"),
                "slow": (f"{base}/slow/photo.jpg", "failed", "timeout"),
                "huge stream": (f"{base}/stream/2000", "failed", "too_large"),
                "huge declared": (f"{base}/declared/2000", "failed", "too_large"),
                "gzip bomb": (f"{base}/gzipbomb/200", "failed", "too_large"),
                "pixel bomb": (f"{base}/img/bomb.png", "failed", "too_many_pixels"),
                # retries
                "404 once": (f"{base}/status/404", "failed", "http_404"),
                "500 retried": (f"{base}/status/500", "failed", "http_500"),
                "retry-after honoured": (f"{base}/retry/ok/1/photo.jpg", "kept", None),
                "retry-after too long": (f"{base}/retry/long/3600/photo.jpg", "failed", "http_503"),
                # other failures
                "loop": (f"{base}/loop/1", "failed", "redirect_loop"),
                "truncated": (f"{base}/truncated/photo.jpg", "failed", "truncated_image"),
                "empty body": (f"{base}/empty/1", "failed", "not_an_image"),
                "html body": (f"{base}/notimage/1", "failed", "not_an_image"),
                "robots": (f"{base}/noai/photo.jpg", "dropped", "robots_optout"),
                # images as they look
                "photo": (f"{base}/img/photo.jpg", "kept", None),
                "photo by name after 2 redirects": (f"{named}/chain/2/photo.jpg", "kept", None),
                "unicode url": (f"{base}/img/ünïcode bild.jpg", "kept", None),
                "trailing bytes": (f"{base}/img/trailing.jpg", "kept", None),
                "exif orientation 6": (f"{base}/img/exif6.jpg", "kept", None),
                "16-bit grey png": (f"{base}/img/grey16.png", "kept", None),
                "16-bit rgb png": (f"{base}/img/rgb16.png", "kept", None),
                "grey jpeg": (f"{base}/img/grey.jpg", "kept", None),
            }
            out = tmp_path_factory.mktemp("hostile-out") / "out"
            config = config_from_dict({"run": {"input": "unused", "output": str(out)}, "download": {
                "thread_count": 8, "timeout": 1, "deadline": 3, "max_body_bytes": 2 << 20,
                "retries": 2, "max_retry_wait": 5, "allow_networks": ["127.0.0.1/32"],
                "hosts": {"images.example": ["127.0.0.1"], "evil.example": ["127.0.0.2"],
                          "mixed.example": ["127.0.0.1", "127.0.0.2"],
                          "metadata.google.internal": ["127.0.0.1"]}}})
            storage = Storage(str(out))
            labels = list(rows)
            storage.write_parquet("input/00000.parquet", pa.table({
                "row_id": list(range(len(labels))), "url": [rows[label][0] for label in labels],
                "caption": labels}))
            stage = DownloadStage(str(out), config.download, shard_size=64)
            stats = stage.run_shard("00000")
            table = download_decisions(storage.read_parquet("download/00000.parquet"))
            images = read_tar_images(storage, "00000")
    finally:
        listener.close()
    result = {row["caption"]: row for row in table.to_pylist()}
    return {"rows": rows, "result": result, "images": images, "requests": requests,
            "listener": listener, "stats": stats, "base": base}


def test_every_row_has_its_exact_status_and_reason(hostile_run) -> None:
    result = hostile_run["result"]
    assert set(result) == set(hostile_run["rows"])  # nothing lost: one row out per row in
    for label, (_, status, reason) in hostile_run["rows"].items():
        row = result[label]
        got = "kept" if row["drop_reason"] is None else row["drop_kind"]
        assert (got, row["drop_reason"]) == (status, reason), (label, row["error_message"])
    hostile_run["stats"].check_conservation()


def test_refused_address_received_no_connection(hostile_run) -> None:
    assert hostile_run["listener"].accepted == 0


def test_final_url_and_redirects_recorded(hostile_run) -> None:
    result, base = hostile_run["result"], hostile_run["base"]
    port = base.rsplit(":", 1)[1]
    chained = result["photo by name after 2 redirects"]
    assert chained["redirects"] == 2
    assert chained["final_url"] == f"http://images.example:{port}/img/photo.jpg"
    refused = result["refused after redirect"]
    assert refused["redirects"] == 1 and refused["final_url"].startswith("http://127.0.0.2:")
    assert result["photo"]["redirects"] == 0 and result["photo"]["final_url"] == f"{base}/img/photo.jpg"
    assert result["unicode url"]["final_url"].endswith("/img/%C3%BCn%C3%AFcode%20bild.jpg")


def test_retries_only_for_transient_failures(hostile_run) -> None:
    result = hostile_run["result"]
    asked = Counter(path for path, _ in hostile_run["requests"])
    assert asked["/status/404"] == 1 and result["404 once"]["attempts"] == 1
    assert asked["/status/500"] == 3 and result["500 retried"]["attempts"] == 3
    assert asked["/retry/long/3600/photo.jpg"] == 1
    times = [when for path, when in hostile_run["requests"] if path == "/retry/ok/1/photo.jpg"]
    assert len(times) == 2 and times[1] - times[0] >= 0.95  # Retry-After: 1 was waited for
    assert result["retry-after honoured"]["attempts"] == 2


def _stored(hostile_run, label: str) -> np.ndarray:
    key = hostile_run["result"][label]["key"]
    with Image.open(io.BytesIO(hostile_run["images"][key][0])) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image)


def test_exif_orientation_applied(hostile_run) -> None:
    pixels = _stored(hostile_run, "exif orientation 6")
    assert pixels.shape == (48, 64, 3)  # upright: wider than tall, as the pattern was drawn
    row = hostile_run["result"]["exif orientation 6"]
    assert (row["original_width"], row["original_height"]) == (64, 48)
    h, w = 24, 32
    regions = {"top_left": pixels[4:h - 4, 4:w - 4], "top_right": pixels[4:h - 4, w + 4:-4],
               "bottom_left": pixels[h + 4:-4, 4:w - 4], "bottom_right": pixels[h + 4:-4, w + 4:-4]}
    for name, region in regions.items():
        assert np.abs(region.reshape(-1, 3).mean(0) - QUADRANTS[name]).max() < 12, name


def test_16_bit_images_scaled_to_8_bits(hostile_run) -> None:
    grey = _stored(hostile_run, "16-bit grey png").astype(int)
    expected = np.round(np.linspace(0, 65535, 256) / 257)
    assert np.abs(grey[..., 0] - expected[None, :]).max() <= 4
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 2 and np.abs(grey[..., 0] - grey[..., 2]).max() <= 2
    rgb = _stored(hostile_run, "16-bit rgb png").astype(int).reshape(-1, 3).mean(0)
    assert np.abs(rgb - [255, 128, 0]).max() < 4


def test_grey_jpeg_stored_with_three_channels(hostile_run) -> None:
    pixels = _stored(hostile_run, "grey jpeg")
    assert pixels.shape == (48, 64, 3)
    assert np.abs(pixels[..., 0].astype(int) - np.arange(0, 256, 4)[None, :]).max() <= 4


def test_trailing_bytes_accepted_and_ignored(hostile_run) -> None:
    assert np.array_equal(_stored(hostile_run, "trailing bytes"), _stored(hostile_run, "photo"))
    assert np.array_equal(_stored(hostile_run, "unicode url"), _stored(hostile_run, "photo"))


def test_stage_counters_match_the_rows(hostile_run) -> None:
    stats = hostile_run["stats"]
    assert stats.rows_in == len(hostile_run["rows"])
    kept = sum(1 for _, status, _ in hostile_run["rows"].values() if status == "kept")
    assert stats.rows_out == kept
