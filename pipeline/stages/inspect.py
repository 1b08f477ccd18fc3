"""The inspect stage: decode every image once, hash it, and apply the resolution and caption filters."""
from __future__ import annotations

import pyarrow as pa

from filters.caption import CaptionFilter
from filters.image import ImageDecodeError, inspect_image
from filters.resolution import ResolutionFilter
from pipeline.stage import RecordStage, Resources


class InspectStage(RecordStage):
    """Writes `phash`, `decoded_width`, `decoded_height`; drops undecodable images (`decode_error`,
    a failure), low-resolution or extreme-shape images (on the original size), and bad captions."""

    name = "inspect"
    needs_images = True

    def __init__(self, output: str, input_stage: str, resolution, caption, resources: Resources):
        super().__init__(output, input_stage, resources)
        self.resolution = ResolutionFilter(resolution)
        self.caption = CaptionFilter(caption)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        phashes, widths, heights, reasons, kinds = [], [], [], [], []
        for image, ow, oh, caption in zip(batch["image"].to_pylist(), batch["original_width"].to_pylist(),
                                          batch["original_height"].to_pylist(), batch["caption"].to_pylist()):
            try:
                info = inspect_image(image or b"")
            except ImageDecodeError as err:
                phashes.append(None), widths.append(None), heights.append(None)
                reasons.append(err.reason), kinds.append("failed")
                continue
            phashes.append(info.phash), widths.append(info.width), heights.append(info.height)
            reason = self.resolution.reason(ow or info.width, oh or info.height) or self.caption.reason(caption)
            reasons.append(reason), kinds.append("dropped" if reason else None)
        return (batch.append_column("phash", pa.array(phashes, pa.int64()))
                .append_column("decoded_width", pa.array(widths, pa.int32()))
                .append_column("decoded_height", pa.array(heights, pa.int32()))
                .append_column("drop_reason", pa.array(reasons, pa.string()))
                .append_column("drop_kind", pa.array(kinds, pa.string())))
