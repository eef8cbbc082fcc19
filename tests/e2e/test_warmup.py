"""Before its first heartbeat a worker runs each model it serves on blank images, once at
batch 1 and once at its largest microbatch, so that its first jobs do not pay the
runtime's first-run costs; a warm-up that fails is logged and the worker serves anyway.
Real Postgres, Redis and S3, the demo model on ONNX Runtime."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from hepato.common.constants import worker_key
from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from tests.e2e.test_inline import job, submit

pytestmark = pytest.mark.slow


class Recording:
    """The demo model, noting each call: its batch size, image shape, whether the
    worker's heartbeat was up; ``fail_first`` calls raise."""

    def __init__(self, model: Model, settings: Settings, fail_first: int = 0) -> None:
        self.model, self.manifest = model, model.manifest
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.key = worker_key(settings.worker_id)
        self.fail_first = fail_first
        self.calls: list[tuple[int, tuple[int, ...], bool]] = []

    def predict(self, images: list[np.ndarray]) -> Any:
        self.calls.append((len(images), images[0].shape, bool(self.redis.exists(self.key))))
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("no warm-up today")
        return self.model.predict(images)


def serve(settings: Settings, model: Recording, **overrides: object) -> None:
    from hepato.worker.runner import Worker

    worker = Worker(settings.model_copy(update=overrides), {model.manifest.name: model}, burst=True)  # type: ignore[dict-item]
    worker.run(install_signals=False)


@pytest.fixture
def named(settings: Settings) -> Settings:
    return settings.model_copy(update={"worker_id": "warm-up-test"})


def test_the_model_runs_at_batch_1_and_its_largest_before_the_heartbeat(
    client: TestClient, named: Settings, models: dict[str, Model]
) -> None:
    [job_id] = submit(client, 1)
    model = Recording(models[named.default_model], named)
    serve(named, model)
    side = model.manifest.input_size
    assert model.calls[:2] == [(1, (side, side, 3), False), (8, (side, side, 3), False)]
    # Then the job, once the worker said it was ready.
    assert len(model.calls) == 3 and model.calls[2][0] == 1 and model.calls[2][2]
    assert job(named, job_id).state == "done"


def test_without_warm_up_the_first_call_is_the_first_job(
    client: TestClient, named: Settings, models: dict[str, Model]
) -> None:
    [job_id] = submit(client, 1)
    model = Recording(models[named.default_model], named)
    serve(named, model, model_warmup=False)
    assert len(model.calls) == 1 and model.calls[0][2]
    assert job(named, job_id).state == "done"


def test_a_failed_warm_up_is_logged_and_the_worker_serves(
    client: TestClient,
    named: Settings,
    models: dict[str, Model],
    caplog: pytest.LogCaptureFixture,
) -> None:
    [job_id] = submit(client, 1)
    model = Recording(models[named.default_model], named, fail_first=1)
    serve(named, model)
    assert "warming hepato-yolov8n up at batch 1 failed" in caplog.text
    # No second warm-up call after a failure: the job is the next one.
    assert len(model.calls) == 2 and model.calls[1][2]
    assert job(named, job_id).state == "done"
