"""Unsafe-image score from the NudeNet detector that ships inside the ``nudenet`` package.

The model (``nudenet/320n.onnx``, a YOLOv8-style detector over 18 body-part classes) is run
directly through onnxruntime so that batches go through one call and the GPU provider is used when
there is one. Pre- and post-processing follow ``nudenet.NudeDetector``: pad to a square at the
bottom/right with black, resize to 320, values in [0, 1] in BGR channel order (NudeDetector reads
with OpenCV and its two channel swaps cancel out); keep boxes whose best class score is at
least 0.2, class-agnostic NMS (score 0.25, IoU 0.45). The score of an image is the highest
confidence among the kept boxes whose class shows exposed anatomy (0 when there is none).
"""
from __future__ import annotations

import io
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
    batch_size: int = ranged(16, "[1, inf)")


class UnsafeScorer:
    """Scores image bodies with the NudeNet detector; call :meth:`setup` once per worker."""

    def __init__(self, config: UnsafeFilterConfig | None = None) -> None:
        self.config = config or UnsafeFilterConfig()
        unknown = set(self.config.classes) - set(NUDENET_CLASSES)
        if unknown:
            raise ValueError(f"unknown NudeNet classes: {sorted(unknown)}")
        self._class_rows = np.array([NUDENET_CLASSES.index(name) for name in self.config.classes])
        self._session = None
        self._input_name = ""

    def setup(self) -> None:
        """Load the ONNX model once; CUDA when onnxruntime offers it, CPU otherwise."""
        import nudenet
        import onnxruntime

        path = self.config.model_path or os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
        available = onnxruntime.get_available_providers()
        providers = [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
        self._session = onnxruntime.InferenceSession(path, providers=providers)
        self._input_name = self._session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session else []

    def teardown(self) -> None:
        self._session = None

    def _preprocess(self, data: bytes) -> np.ndarray:
        import cv2
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
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
