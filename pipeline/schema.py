"""Column names, defined once: every module that reads or writes a column imports it from here.

The base columns are written by the input step, the download stage (img2dataset's own names) and
the decision logic; each registered stage declares the columns it adds (`StageSpec.columns`), so a
new stage adds its names in its own module. `reserved_columns()` is their union: an input column
with one of those names is carried as `source_<name>` so that the user's data is never overwritten.
"""
from __future__ import annotations

# Decision columns, on every stage's rows: null when the row was kept.
DROP_REASON = "drop_reason"
DROP_KIND = "drop_kind"  # "dropped" (a decision) or "failed" (could not be processed)

ROW_ID = "row_id"
KEY = "key"
URL = "url"
CAPTION = "caption"

# img2dataset's columns and ours beside them in the download stage's Parquet.
DOWNLOAD_COLUMNS = (
    "status", "error_message", "width", "height", "original_width", "original_height", "exif",
    "md5", "sha256", "sha512", "final_url", "redirects", "attempts",
)
# Where an image's bytes lie in its download tar, and the bytes themselves while a stage runs.
TAR_OFFSET = "tar_offset"
TAR_SIZE = "tar_size"
IMAGE = "image"

PHASH = "phash"
SHA256 = "sha256"
UNSAFE_SCORE = "unsafe_score"
DUPLICATE_OF = "duplicate_of"
CLUSTER_ID = "cluster_id"
CLUSTER_SIZE = "cluster_size"
CAPTION_BT_DE = "caption_bt_de"
CAPTION_BT_RU = "caption_bt_ru"
BACK_TRANSLATION_COLUMNS = (CAPTION_BT_DE, CAPTION_BT_RU)
# Captions a training sample may use: the original and its back-translations.
CAPTION_COLUMNS = (CAPTION, *BACK_TRANSLATION_COLUMNS)

BASE_COLUMNS = frozenset({ROW_ID, KEY, URL, CAPTION, DROP_REASON, DROP_KIND, TAR_OFFSET, TAR_SIZE, IMAGE,
                          *DOWNLOAD_COLUMNS})


def reserved_columns() -> frozenset[str]:
    """Every column name the pipeline writes: the base ones and those of every registered stage."""
    from pipeline.registry import registered_stages

    names = set(BASE_COLUMNS)
    for spec in registered_stages().values():
        names.update(spec.columns)
    return frozenset(names)
