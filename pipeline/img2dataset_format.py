"""img2dataset's shard files, written without importing img2dataset.

`download/NNNNN.tar`, `NNNNN.parquet` and `NNNNN_stats.json` are the files img2dataset's
`WebDatasetSampleWriter` and `write_stats` produce, so any tool that reads img2dataset output reads
ours. The package itself is not imported in the workers: `import img2dataset` loads torch (through
webdataset), wandb and albumentations, 3.7-4.1 CPU-seconds per download worker
(`bench/fixed_costs.py`), to write a tar file. `tests/pipeline/test_img2dataset_format.py` holds
this writer to img2dataset's own: same member names, order, bytes and headers, same stats keys,
same keys.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import url_to_fs

# webdataset's TarWriter defaults, which img2dataset's writer keeps.
TAR_USER = TAR_GROUP = "bigdata"
TAR_MODE = 0o444


def compute_key(index: int, shard_id: int, oom_sample_per_shard: int, oom_shard_count: int) -> str:
    """img2dataset's sample key: the shard id then the row's index in it, zero-padded."""
    return f"{(10 ** oom_sample_per_shard) * shard_id + index:0{oom_sample_per_shard + oom_shard_count}d}"


def shard_file_name(shard_id: int, oom_shard_count: int) -> str:
    return f"{shard_id:0{oom_shard_count}d}"


class WebDatasetShardWriter:
    """One shard: `<folder>/NNNNN.tar` (per kept sample `<key>.<format>`, `.json`, `.txt`, in
    webdataset's order) and `<folder>/NNNNN.parquet` (one row of `schema` per sample, kept or not).

    The parquet is written once at `close()`, sorted by key (img2dataset writes completion order
    in row groups of 100; the download stage sorted it by key afterwards anyway).
    """

    def __init__(self, shard_id: int, folder: str, schema: pa.Schema, encode_format: str,
                 oom_shard_count: int):
        name = shard_file_name(shard_id, oom_shard_count)
        self.fs, root = url_to_fs(folder)
        self.parquet_path = f"{root}/{name}.parquet"
        self.schema = schema
        self.encode_format = encode_format
        self.rows: list[dict] = []
        self.tar_file = self.fs.open(f"{root}/{name}.tar", "wb")
        self.tar = tarfile.open(fileobj=self.tar_file, mode="w|")

    def write(self, image: bytes | None, key: str, caption: str | None, meta: dict) -> None:
        if image is not None:
            meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}
            members = {self.encode_format: image, "txt": "" if caption is None else str(caption),
                       "json": json.dumps(meta, indent=4)}
            now = time.time()
            for extension in sorted(members):
                data = members[extension]
                data = data.encode("utf-8") if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), now, TAR_MODE
                info.uname, info.gname = TAR_USER, TAR_GROUP
                self.tar.addfile(info, io.BytesIO(data))
        self.rows.append(meta)

    def close(self) -> pa.Table:
        """Finish both files; returns the parquet's table."""
        self.tar.close()
        self.tar_file.close()
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        if table.num_rows:
            table = table.sort_by("key")
        with self.fs.open(self.parquet_path, "wb") as handle:
            pq.write_table(table, handle)
        return table


def write_stats(folder: str, shard_id: int, count: int, successes: int, failed_to_download: int,
                failed_to_resize: int, start_time: float, end_time: float, status_dict: Counter,
                oom_shard_count: int) -> None:
    """img2dataset's `NNNNN_stats.json`: the same keys, values and layout as its `write_stats`."""
    stats = {"count": count, "successes": successes, "failed_to_download": failed_to_download,
             "failed_to_resize": failed_to_resize, "duration": end_time - start_time,
             "start_time": start_time, "end_time": end_time, "status_dict": status_dict}
    fs, root = url_to_fs(folder)
    with fs.open(f"{root}/{shard_file_name(shard_id, oom_shard_count)}_stats.json", "w") as handle:
        json.dump(stats, handle, indent=4)
