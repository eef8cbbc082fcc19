"""The ``null`` model: a detector that computes nothing and finds nothing.

``hepato bench`` runs it to measure the system alone: upload, queue, claim, download,
decode, write and status, with the model's share of the time at zero. Whatever a
worker serving it does per image is the system's own cost."""

from __future__ import annotations

import numpy as np

from hepato.common.manifest import DetectManifest
from hepato.common.results import DetectResult, TaskResult
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.calls import Prediction, predict_whole


class NullModel:
    """A fixed result per image (no boxes), whatever the image, in one call per batch."""

    def __init__(self, manifest: DetectManifest, runtime: Runtime) -> None:
        # No weights, no threads, no device: the runtime has nothing to configure here.
        del runtime
        self.manifest = manifest

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        return predict_whole(images, self._run)

    @staticmethod
    def _run(images: list[np.ndarray]) -> list[TaskResult]:
        return [DetectResult(boxes=[]) for _ in images]
