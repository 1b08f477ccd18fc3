"""The inspect stage: decode every image once, hash it, and apply the resolution and caption filters."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from filters.caption import CaptionFilter, CaptionFilterConfig
from filters.image import ImageDecodeError, inspect_image
from filters.resolution import ResolutionFilter, ResolutionFilterConfig
from pipeline.registry import StageSpec, register_stage
from pipeline.schema import DROP_KIND, DROP_REASON, PHASH
from pipeline.stage import RecordStage, Resources

DECODED_WIDTH = "decoded_width"
DECODED_HEIGHT = "decoded_height"


@dataclass
class InspectConfig:
    """Decode and hash every image; the resolution/shape and caption filters."""

    resolution: ResolutionFilterConfig = field(default_factory=ResolutionFilterConfig)
    caption: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)
    resources: Resources = field(default_factory=Resources)


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
        return (batch.append_column(PHASH, pa.array(phashes, pa.int64()))
                .append_column(DECODED_WIDTH, pa.array(widths, pa.int32()))
                .append_column(DECODED_HEIGHT, pa.array(heights, pa.int32()))
                .append_column(DROP_REASON, pa.array(reasons, pa.string()))
                .append_column(DROP_KIND, pa.array(kinds, pa.string())))


register_stage(StageSpec(
    name="inspect", section="inspect", config=InspectConfig, needs_images=True,
    build=lambda section, ctx: [InspectStage(ctx.output, ctx.input_stage, section.resolution, section.caption,
                                             section.resources)],
    columns=(PHASH, DECODED_WIDTH, DECODED_HEIGHT),
    description="decode and hash every image; resolution, shape and caption filters"))
