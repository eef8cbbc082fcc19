"""How a microbatch becomes model calls, timed.

Detectors that letterbox to a minimal rectangle (YOLO) or resize by the long side (DETR)
treat a list of mixed sizes differently from each image alone; only equal-size groups
give, box for box, what the model gives for each image by itself. Those run one call per
image size (tiles of one size, the usual case, still make one call). Models that resize
every image to one fixed input run the whole microbatch as one call."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Results per image, the size of the model call each image ran in, and the total model
# time in ms.
Prediction = tuple[list[T], list[int], float]


def predict_by_shape(
    images: list[np.ndarray], run_group: Callable[[list[np.ndarray]], list[T]]
) -> Prediction[T]:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape].append(i)
    out: list[T | None] = [None] * len(images)
    sizes = [0] * len(images)
    started = time.perf_counter()
    for indices in groups.values():
        found = run_group([images[i] for i in indices])
        for i, result in zip(indices, found, strict=True):
            out[i] = result
            sizes[i] = len(indices)
    elapsed = (time.perf_counter() - started) * 1000.0
    return [r for r in out if r is not None], sizes, elapsed


def predict_whole(
    images: list[np.ndarray], run: Callable[[list[np.ndarray]], list[T]]
) -> Prediction[T]:
    started = time.perf_counter()
    out = run(images)
    elapsed = (time.perf_counter() - started) * 1000.0
    return out, [len(images)] * len(images), elapsed
