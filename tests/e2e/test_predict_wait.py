"""/v1/predict's wait: the caller listens for its job before the job exists, so the one
read of the job is the one after it finished (not one per event, nor one up front).
Real Postgres, Redis and S3, a worker in a thread."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from hepato.gateway import finish_watch
from hepato.worker.backends.base import Model
from tests.conftest import SAMPLES
from tests.e2e.conftest import images

pytestmark = pytest.mark.slow


def test_a_predict_caller_reads_its_job_once_it_has_finished(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hepato.worker.runner import Worker

    # No periodic re-read within the test: every read comes from a wake-up.
    client.app.state.finish_watch.reread_s = 600.0  # type: ignore[attr-defined]
    reads: list[tuple[list[uuid.UUID], list[str]]] = []
    real_jobs = finish_watch._jobs

    def counted(engine: Any, ids: list[uuid.UUID]) -> Any:
        found = real_jobs(engine, ids)
        reads.append((ids, [found[i].state for i in ids if i in found]))
        return found

    monkeypatch.setattr(finish_watch, "_jobs", counted)
    worker = Worker(settings, models)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    try:
        path = images(SAMPLES, "synthetic_*.png")[0]
        for _ in range(3):
            reads.clear()
            response = client.post("/v1/detect", files={"file": ("a.png", path.read_bytes())})
            assert response.status_code == 200, response.text
            job_id = uuid.UUID(response.json()["job_id"])
            assert reads == [([job_id], ["done"])], "one read, after the job finished"
    finally:
        worker.stopping.set()
        thread.join(timeout=30)
