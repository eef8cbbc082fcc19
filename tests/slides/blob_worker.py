"""A worker process serving the blob detector of tests/slides/planted.py, slowed down so
that a test can kill it in the middle of a slide. Settings come from HEPATO_* variables."""

from __future__ import annotations

import time

import numpy as np

from hepato.common.results import TaskResult
from hepato.common.settings import Settings
from hepato.worker.backends.calls import Prediction
from hepato.worker.runner import Worker
from tests.slides.planted import BlobDetector, manifest


class SlowBlobs(BlobDetector):
    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        time.sleep(0.3)
        return super().predict(images)


if __name__ == "__main__":
    Worker(Settings(), {"blobs": SlowBlobs(manifest())}).run()
