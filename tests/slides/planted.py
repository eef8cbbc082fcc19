"""A synthetic slide with objects planted where tiling is hardest, and a detector that
finds them exactly: what the whole-slide tests check the service against.

The slide is tissue (a pink, noisy texture) on the left and empty glass on the right.
Coloured squares stand for objects: some well inside tiles, some straddling the border
between two tiles' cores, one on the corner of four, one on a tile's own edge. The test
model ``blobs`` (input 128 px at 1 µm/px, 32 px overlap) reads tiles of 256 level-0 px
(the slide is 0.5 µm/px) every 192 px; cores meet at 192·i + 32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from hepato.common.manifest import DetectManifest, parse_manifest
from hepato.common.results import DetectResult, TaskResult, make_box
from hepato.worker.backends.calls import Prediction, predict_whole

WIDTH, HEIGHT = 2304, 1536
MPP = 0.5
TISSUE_RIGHT = 1400  # tissue is x < this; the rest is empty glass
OBJECT = 40  # side of a planted object, level-0 px (20 model px: less than the overlap)
COLOURS = {"steatosis": (40, 60, 220), "inflammation": (200, 30, 40)}
MANIFEST = {
    "name": "blobs",
    "task": "detect",
    "backend": "null",
    "labels": ["steatosis", "inflammation"],
    "input_size": 128,
    "max_batch_size": 8,
    "max_wait_ms": 5,
    "mpp": 1.0,
    "tile_overlap": 32,
}
# (centre x, centre y, label), level 0.
OBJECTS: tuple[tuple[int, int, str], ...] = (
    (100, 100, "steatosis"),  # inside the first tile
    (224, 700, "steatosis"),  # on the border of two cores (columns 0 and 1)
    (500, 224, "inflammation"),  # on the border of two cores (rows 0 and 1)
    (608, 608, "steatosis"),  # on the corner of four cores
    (192, 1000, "inflammation"),  # on tile 1's left edge, inside tile 0's
    (1000, 1200, "steatosis"),
    (1250, 400, "inflammation"),
    (30, 1500, "steatosis"),  # at the slide's corner
)


def picture(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    tissue = np.array([235, 170, 210], np.int16) + rng.integers(-12, 12, (HEIGHT, TISSUE_RIGHT, 3))
    img[:, :TISSUE_RIGHT] = np.clip(tissue, 0, 255).astype(np.uint8)
    half = OBJECT // 2
    for x, y, label in OBJECTS:
        img[max(0, y - half) : y + half, max(0, x - half) : x + half] = COLOURS[label]
    return img


def _pyramid(img: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    out = [img]
    for _ in range(levels - 1):
        prev = out[-1]
        out.append(
            cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA)
        )
    return out


def write_tiff(path: Path, *, mpp: float | None = MPP, img: np.ndarray | None = None) -> Path:
    """A generic tiled pyramidal TIFF (lossless), MPP in its resolution tags unless None."""
    levels = _pyramid(picture() if img is None else img)
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate(levels):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / mpp / 2**i
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                lv,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
                **extra,
            )
    return path


def write_svs(path: Path, *, img: np.ndarray | None = None, patient: str = "Jane Doe") -> Path:
    """An Aperio-like SVS of the same picture, with label and macro pages naming a patient."""
    levels = _pyramid(picture() if img is None else img)
    w, h = levels[0].shape[1], levels[0].shape[0]
    head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (256x256)"
    meta = f"JPEG/RGB Q=95|AppMag = 20|MPP = {MPP}|Filename = {patient}|User = {patient}"
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 95}, "photometric": "rgb"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(256, 256), description=f"{head} {meta}", metadata=None, **jpeg)
        for lv in levels[1:]:
            size = f"{lv.shape[1]}x{lv.shape[0]}"
            tif.write(lv, tile=(256, 256), description=f"{head} -> {size}", metadata=None, **jpeg)
        label = np.full((200, 300, 3), 255, np.uint8)
        cv2.putText(label, patient, (10, 100), cv2.FONT_HERSHEY_SIMPLEX, 1, (0, 0, 0), 2)
        for kind, sub in (("label", 1), ("macro", 9)):
            tif.write(
                label,
                description=f"Aperio Image Library v12.0.15\n{kind} 300x200 {patient}",
                subfiletype=sub,
                photometric="rgb",
                metadata=None,
            )
    return path


def manifest() -> DetectManifest:
    m = parse_manifest(MANIFEST)
    assert isinstance(m, DetectManifest)
    return m


@dataclass
class BlobDetector:
    """Finds the planted squares by colour: exact, deterministic, and any size of batch."""

    manifest: DetectManifest

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        return predict_whole(images, self._run)

    def _run(self, images: list[np.ndarray]) -> list[TaskResult]:
        return [self._one(img) for img in images]

    def _one(self, img: np.ndarray) -> TaskResult:
        boxes = []
        labels = self.manifest.labels
        for class_id, label in enumerate(labels):
            colour = np.array(COLOURS[label], np.int16)
            near = np.abs(img.astype(np.int16) - colour).max(axis=2) < 40
            n, _, stats, _ = cv2.connectedComponentsWithStats(near.astype(np.uint8), 8)
            for i in range(1, n):
                x, y, w, h, area = stats[i]
                if area >= 4:
                    boxes.append(make_box(labels, class_id, 0.9, (x, y, x + w, y + h)))
        return DetectResult(boxes=boxes)
