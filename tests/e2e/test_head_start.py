"""Head starts (worker.head_start): a lone /v1/detect is announced before its job
commits, an idle worker runs the model on it meanwhile, and the claimed job takes those
results, the same as the model gives through the queue; with two workers, each job goes
to the one that ran its head start; a head start whose job never commits writes nothing.
Real Postgres, Redis and S3, workers in threads."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hepato.common import dispatch, ids
from hepato.common.constants import (
    PUBLIC_TENANT,
    Priority,
    queue_key,
    taken_key,
    taker_key,
    worker_key,
)
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job
from hepato.worker import head_start
from hepato.worker.backends.base import Model
from hepato.worker.microbatch import MicroBatch
from hepato.worker.runner import Worker
from tests.conftest import SAMPLES
from tests.e2e.conftest import images

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def serving(settings: Settings, models: dict[str, Model], worker_id: str = "") -> Iterator[Worker]:
    """A worker in a thread, returned once it serves (its heartbeat is up)."""
    running = Worker(settings.model_copy(update={"worker_id": worker_id}), models)
    thread = threading.Thread(target=running.run, kwargs={"install_signals": False})
    thread.start()
    r = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 60
    while not r.exists(worker_key(running.id)):
        assert time.monotonic() < deadline, "the worker never served"
        time.sleep(0.05)
    try:
        yield running
    finally:
        running.stopping.set()
        thread.join(timeout=30)


@pytest.fixture
def worker(settings: Settings, models: dict[str, Model]) -> Iterator[Worker]:
    with serving(settings, models) as running:
        yield running


def head_starts(worker: Worker, outcome: str) -> float:
    """hepato_head_starts_total of the worker's model (one registry per process)."""
    model = next(iter(worker.models))
    labels = {"model": model, "outcome": outcome}
    return REGISTRY.get_sample_value("hepato_head_starts_total", labels) or 0.0


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_lone_detect_is_answered_from_its_head_start_with_the_models_results(
    client: TestClient, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    reused: list[bool] = []
    real = head_start.HeadStarts.reuse

    def counted(batch: MicroBatch) -> bool:
        found = real(batch)
        if not batch.speculative:  # the claimed batches, not the head starts themselves
            reused.append(found)
        return found

    monkeypatch.setattr(head_start.HeadStarts, "reuse", staticmethod(counted))
    data = images(SAMPLES, "synthetic_*.png")[0].read_bytes()
    before = {o: head_starts(worker, o) for o in ("started", "used")}
    answers = []
    for _ in range(3):
        response = client.post("/v1/detect", files={"file": ("a.png", data)})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert reused == [True, True, True], "each ran on its head start"
    assert {o: head_starts(worker, o) - n for o, n in before.items()} == {"started": 3, "used": 3}
    # The same image through the queue alone (a batch is never announced).
    response = client.post("/v1/batches", files=[("files", ("a.png", data, "image/png"))])
    assert response.status_code == 202, response.text
    queued = response.json()["jobs"][0]["job_id"]
    wait_for(lambda: client.get(f"/v1/jobs/{queued}").json()["state"] == "done", "queued job")
    assert reused == [True, True, True, False], "no head start for a batch's job"
    expected = client.get(f"/v1/jobs/{queued}").json()["result"]
    for answer in answers:
        assert answer["result"] == expected
        row = client.get(f"/v1/jobs/{answer['job_id']}").json()
        assert row["state"] == "done" and row["result"] == expected and row["attempts"] == 1


def test_a_head_start_whose_job_never_commits_writes_nothing(
    settings: Settings, worker: Worker
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    data = images(SAMPLES, "synthetic_*.png")[0].read_bytes()
    announced = str(ids.new_job_id())
    dispatch.hint(r, settings.default_model, announced, data, 60.0)
    wait_for(lambda: not worker.head_starts.without([announced]), "the hint was taken")
    wait_for(lambda: worker.head_starts._kept[announced].inferred_at is not None, "it ran")
    with Session(get_engine(settings.database_url)) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert worker.batches == 0 and worker.jobs_done == 0, "nothing claimed, nothing written"


def test_two_idle_workers_each_take_the_jobs_whose_hints_they_took(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each job's id goes to the worker that ran its head start, not to whichever worker
    Redis wakes first: every answer comes from a head start."""
    reused: list[bool] = []
    real = head_start.HeadStarts.reuse

    def counted(batch: MicroBatch) -> bool:
        found = real(batch)
        if not batch.speculative:
            reused.append(found)
        return found

    monkeypatch.setattr(head_start.HeadStarts, "reuse", staticmethod(counted))
    data = images(SAMPLES, "synthetic_*.png")[0].read_bytes()
    with serving(settings, models, "worker-a") as a, serving(settings, models, "worker-b") as b:
        for _ in range(4):
            response = client.post("/v1/detect", files={"file": ("a.png", data)})
            assert response.status_code == 200, response.text
        assert reused == [True] * 4, "each ran on its head start"
        assert a.batches + b.batches == 4


def test_a_stopped_worker_is_sent_no_more_ids_for_its_head_starts(
    settings: Settings, worker: Worker
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    model = settings.default_model
    announced = str(ids.new_job_id())
    dispatch.hint(r, model, announced, images(SAMPLES, "synthetic_*.png")[0].read_bytes(), 60.0)
    wait_for(lambda: worker.head_starts.has(announced), "the hint was taken")
    assert r.get(taker_key(announced)) == taken_key(worker.id, model).encode()
    worker.stopping.set()
    wait_for(lambda: not r.exists(worker_key(worker.id)), "the worker stopped")
    # Its job commits only now: its id goes to the queue, where another worker takes it.
    dispatch.push(r, model, Priority.urgent, [announced], hinted=True)
    assert r.lrange(queue_key(model, Priority.urgent, PUBLIC_TENANT), 0, -1) == [announced.encode()]
