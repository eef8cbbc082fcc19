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
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

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


G = TypeVar("G")  # what the model takes for one group of images
R = TypeVar("R")  # what it gives back for that group


@dataclass(frozen=True)
class Prepared(Generic[G]):
    """A microbatch made ready for the model in equal-shape groups: for each group, the
    positions of its images in the microbatch and the model's input for them."""

    groups: list[tuple[list[int], G]]
    count: int


def prepare_by_shape(
    images: list[np.ndarray], prepare_group: Callable[[list[np.ndarray]], G]
) -> Prepared[G]:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape].append(i)
    return Prepared(
        [(idx, prepare_group([images[i] for i in idx])) for idx in groups.values()], len(images)
    )


def finish_groups(
    prepared: Prepared[G], raws: list[R], finish_group: Callable[[G, R], list[T]]
) -> tuple[list[T], list[int]]:
    """Results in the microbatch's order, and the size of the model call of each."""
    out: list[T | None] = [None] * prepared.count
    sizes = [0] * prepared.count
    for (indices, group), raw in zip(prepared.groups, raws, strict=True):
        for i, result in zip(indices, finish_group(group, raw), strict=True):
            out[i] = result
            sizes[i] = len(indices)
    return [r for r in out if r is not None], sizes


class Phased(Protocol[G, R, T]):
    """A model whose CPU work around the model call can run in the worker's other stages
    (infinity's batch handler does the same): ``prepare`` beside the intake, ``run`` on
    the model stage, ``finish`` beside the writes. ``predict`` is the three in a row."""

    def prepare(self, images: list[np.ndarray]) -> Prepared[G]: ...

    def run(self, prepared: Prepared[G]) -> list[R]: ...

    def finish(self, prepared: Prepared[G], raws: list[R]) -> tuple[list[T], list[int]]: ...


def predict_phased(model: Phased[G, R, T], images: list[np.ndarray]) -> Prediction[T]:
    prepared = model.prepare(images)
    started = time.perf_counter()
    raws = model.run(prepared)
    elapsed = (time.perf_counter() - started) * 1000.0
    results, sizes = model.finish(prepared, raws)
    return results, sizes, elapsed
