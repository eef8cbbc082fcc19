"""Running a microbatch as one model call per image size.

Detectors letterbox a list of mixed sizes to a full square but a single image to its
minimal rectangle; only equal-size groups give, box for box, what the model gives for
each image alone. Tiles of one size, the usual case, still run as one call."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from common.jobs import DetectionRow

Prediction = tuple[list[list[DetectionRow]], list[int], float]


def predict_by_shape(
    images: list[np.ndarray],
    run_group: Callable[[list[np.ndarray]], list[list[DetectionRow]]],
) -> Prediction:
    """Detections per image, the size of the model call each image ran in, and the total
    inference time in ms."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape].append(i)
    out: list[list[DetectionRow]] = [[] for _ in images]
    sizes = [0] * len(images)
    started = time.perf_counter()
    for indices in groups.values():
        found = run_group([images[i] for i in indices])
        for i, dets in zip(indices, found, strict=True):
            out[i] = dets
            sizes[i] = len(indices)
    return out, sizes, (time.perf_counter() - started) * 1000.0
