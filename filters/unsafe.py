"""Unsafe-image score from the NudeNet detector that ships inside the ``nudenet`` package.

The model (``nudenet/320n.onnx``, a YOLOv8-style detector over 18 body-part classes) is run
directly through onnxruntime so that batches go through one call, the session's threads match the
worker's CPUs, and the CUDA provider is used when the worker has a GPU. Pre- and post-processing
follow ``nudenet.NudeDetector`` (exactly so with ``jpeg_draft`` off): pad to a square at the
bottom/right with black, resize to 320, values in [0, 1] in BGR channel order (NudeDetector reads
with OpenCV and its two channel swaps cancel out); keep boxes whose best class score is at
least 0.2, class-agnostic NMS (score 0.25, IoU 0.45). The score of an image is the highest
confidence among the kept boxes whose class shows exposed anatomy (0 when there is none).
"""
from __future__ import annotations

import io
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from filters.base import UNSAFE_IMAGE
from pipeline.configtools import ranged

# The detector's output classes, in the order of its output rows (nudenet/nudenet.py). A Literal,
# so the config loader refuses an unknown class in unsafe.classes before any work.
NudeNetClass = Literal[
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
]
NUDENET_CLASSES: tuple[str, ...] = typing.get_args(NudeNetClass)
# Exposed male chest, belly, armpits and feet are ordinary beach and sports photos, not unsafe.
DEFAULT_UNSAFE_CLASSES = (
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
)
_MIN_BOX_SCORE = 0.2
_NMS_SCORE = 0.25
_NMS_IOU = 0.45
# With jpeg_draft, a JPEG whose longer side is at least 2 x DRAFT_MARGIN x input_size (1,280 px) is
# decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), its longer side kept >= DRAFT_MARGIN x
# input_size. At 1,280-2,560 px this cuts the decode from ~23 to ~9 ms a photo; a smaller margin
# moved more decisions (docs/BENCHMARKS.md). Images under 1,280 px are decoded exactly as before.
DRAFT_MARGIN = 2.0

log = logging.getLogger(__name__)


@dataclass
class UnsafeFilterConfig:
    """Threshold on the unsafe score and the classes that count.

    ``threshold`` 0.5: 2 of 1,000 benign Flickr8k photos (0.2%) score at or above it (see
    docs/BENCHMARKS.md); ``model_path`` None uses the model bundled with ``nudenet``.
    """

    threshold: float = ranged(0.5, "[0, 1]")  # scores are detector confidences in [0, 1]
    classes: tuple[NudeNetClass, ...] = field(default_factory=lambda: DEFAULT_UNSAFE_CLASSES)
    input_size: int = ranged(320, "[32, 4096]")  # the detector's strides reach 32 pixels
    model_path: str | None = None
    # Images per onnxruntime call. On CPU, 4 is the fastest per core here (one-thread session, 320n:
    # ~6% more images per CPU-second than 16, ~10% more than 32); on a GPU give 64 or more.
    batch_size: int = ranged(4, "[1, inf)")
    # Decode JPEGs of 1,280 px or more at a reduced scale (Pillow's draft mode): the detector sees
    # 320 px. Off: pixels exactly as nudenet.NudeDetector gets them, at any size.
    jpeg_draft: bool = True


class UnsafeScorer:
    """Scores image bodies with the NudeNet detector; call :meth:`setup` once per worker.

    ``threads`` is the onnxruntime intra-op thread count: the CPUs the worker was given (its
    default, one thread per core of the machine, oversubscribes a node shared by several actors).
    ``use_gpu`` asks for the CUDA provider; it is used only when onnxruntime offers it.
    """

    def __init__(self, config: UnsafeFilterConfig | None = None, threads: int = 1,
                 use_gpu: bool = False) -> None:
        self.config = config or UnsafeFilterConfig()
        unknown = set(self.config.classes) - set(NUDENET_CLASSES)
        if unknown:
            raise ValueError(f"unknown NudeNet classes: {sorted(unknown)}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.use_gpu = use_gpu
        self._class_rows = np.array([NUDENET_CLASSES.index(name) for name in self.config.classes])
        self._session = None
        self._input_name = ""

    def setup(self) -> None:
        """Load the ONNX model once: CUDA when asked for and offered, else CPU with ``threads`` threads."""
        import nudenet
        import onnxruntime

        path = self.config.model_path or os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
        providers = ["CPUExecutionProvider"]
        if self.use_gpu:
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("unsafe: GPUs were given but onnxruntime has no CUDA provider (install "
                            "onnxruntime-gpu); running on CPU with %d thread(s)", self.threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn the CPU between batches that other actors on the node could use.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(path, options, providers=providers)
        self._input_name = self._session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session else []

    def teardown(self) -> None:
        self._session = None

    def decode(self, data: bytes) -> np.ndarray:
        """RGB pixels (height, width, 3); a JPEG well above input_size comes out at 1/2, 1/4 or 1/8 scale."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            side = max(image.size)
            target = self.config.input_size * DRAFT_MARGIN
            if self.config.jpeg_draft and image.format == "JPEG" and side >= 2 * target:
                # draft() keeps each side at least the requested one, so the longer side stays >= target.
                image.draft(None, (math.ceil(image.width * target / side), math.ceil(image.height * target / side)))
            return np.asarray(image.convert("RGB"))

    def _preprocess(self, data: bytes) -> np.ndarray:
        import cv2

        pixels = self.decode(data)
        side = max(pixels.shape[:2])
        square = np.zeros((side, side, 3), np.uint8)
        square[: pixels.shape[0], : pixels.shape[1]] = pixels
        size = self.config.input_size
        resized = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
        return resized[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0

    def _image_score(self, output: np.ndarray) -> float:
        import cv2

        rows = output.T  # (boxes, 4 + classes)
        class_scores = rows[:, 4:]
        best = class_scores.max(axis=1)
        candidates = np.flatnonzero(best >= _MIN_BOX_SCORE)
        if candidates.size == 0:
            return 0.0
        centre_x, centre_y, width, height = rows[candidates, :4].T
        boxes = np.stack((centre_x - width / 2, centre_y - height / 2, width, height), axis=1)
        kept = np.asarray(cv2.dnn.NMSBoxes(boxes.tolist(), best[candidates].tolist(), _NMS_SCORE, _NMS_IOU),
                          dtype=np.int64).reshape(-1)
        if kept.size == 0:
            return 0.0
        kept = candidates[kept]
        # A kept box is labelled by its best class only, as NudeDetector reports it.
        labels = class_scores[kept].argmax(axis=1)
        unsafe = np.isin(labels, self._class_rows)
        return float(best[kept][unsafe].max()) if unsafe.any() else 0.0

    def score_batch(self, images: list[bytes]) -> np.ndarray:
        """Unsafe score in [0, 1] per image body (float32). Undecodable bodies raise ValueError."""
        if self._session is None:
            raise RuntimeError("UnsafeScorer.setup() was not called")
        scores = np.zeros(len(images), np.float32)
        for begin in range(0, len(images), self.config.batch_size):
            chunk = images[begin: begin + self.config.batch_size]
            try:
                batch = np.stack([self._preprocess(data) for data in chunk])
            except OSError as error:
                raise ValueError(f"undecodable image in batch: {error}") from error
            outputs = self._session.run(None, {self._input_name: batch})[0]
            for offset, output in enumerate(outputs):
                scores[begin + offset] = self._image_score(output)
        return scores

    def reason(self, score: float) -> str | None:
        return UNSAFE_IMAGE if score >= self.config.threshold else None
