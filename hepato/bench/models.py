"""Bare-model throughput: each model's own ``predict`` at several microbatch sizes, on
the same images, in one process. The ratios (batch 8 vs batch 1) are what to compare
across machines; absolute figures depend on the cores and the GPU."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hepato.common.manifest import ModelManifest
from hepato.worker.backends.base import Model, Runtime, load_model
from hepato.worker.decode import decode_rgb


@dataclass(frozen=True)
class Measurement:
    model: str
    task: str
    backend: str
    input_size: int
    batch: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def sample_images(folder: Path, pattern: str = "synthetic_*.png") -> list[np.ndarray]:
    images = [decode_rgb(p.read_bytes()) for p in sorted(folder.glob(pattern))]
    if not images:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    return images


def measure(
    model: Model, images: Sequence[np.ndarray], batch: int, min_seconds: float, min_calls: int
) -> Measurement:
    """Run microbatches of ``batch`` images (cycling through ``images``) for at least
    ``min_seconds`` and ``min_calls`` calls, after one warm-up call."""
    inputs = [images[i % len(images)] for i in range(batch)]
    model.predict(inputs)  # warm-up: lazy init, allocator, kernel selection
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        model.predict(inputs)
        calls += 1
    elapsed = time.perf_counter() - started
    m = model.manifest
    return Measurement(m.name, m.task, m.backend, m.input_size, batch, calls * batch, elapsed)


def bench_models(
    manifests: Sequence[ModelManifest],
    runtime: Runtime,
    images: Sequence[np.ndarray],
    batches: Sequence[int],
    *,
    min_seconds: float,
    min_calls: int,
) -> list[Measurement]:
    out: list[Measurement] = []
    for manifest in manifests:
        model = load_model(manifest, runtime)
        out.extend(measure(model, images, b, min_seconds, min_calls) for b in batches)
        del model
    return out
