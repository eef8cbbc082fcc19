"""Overload: a bounded queue per model (429, nothing kept), and urgent jobs overtaking
routine ones. (Deadlines and cancellation are in tests/e2e/test_pipeline.py.)"""

from __future__ import annotations

import statistics

import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from tests.chaos.conftest import ids, judge
from tests.e2e.test_pipeline import db_jobs, submit, thirty_two, upload

pytestmark = pytest.mark.slow


def objects(settings: Settings) -> int:
    store = ObjectStore(settings)
    return sum(1 for _ in store.client.list_objects(settings.s3_bucket, recursive=True))


def test_a_full_queue_refuses_the_whole_request_with_429(
    settings: Settings, run_worker, completions
) -> None:
    from hepato.gateway.app import create_app

    bounded = settings.model_copy(update={"max_queued_per_model": 6})
    with TestClient(create_app(bounded)) as client:
        first = submit(client, thirty_two()[:4])
        assert first["accepted"] == 4
        stored = objects(bounded)
        response = client.post("/v1/batches", files=upload(thirty_two()[:3]))
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) > 0
        assert "queue of model 'hepato-yolov8n' is full (4 of 6" in response.json()["detail"]
        single = client.post("/v1/jobs", files={"file": ("a.png", thirty_two()[0].read_bytes())})
        assert single.status_code == 202, "one more still fits (5 of 6)"
        assert len(db_jobs(bounded)) == 5, "nothing of the refused request was kept"
        assert objects(bounded) == stored + 1, "nor stored"
        # One file skips the up-front check: its PUT runs alongside the insert, whose own
        # check refuses it; the object is removed once the PUT is done, never left behind.
        last = client.post("/v1/jobs", files={"file": ("b.png", thirty_two()[1].read_bytes())})
        late = client.post("/v1/predict", files={"file": ("c.png", thirty_two()[2].read_bytes())})
        assert late.status_code == 429, late.text
        assert len(db_jobs(bounded)) == 6 and objects(bounded) == stored + 2
        run_worker()
        again = submit(client, thirty_two()[:6])
        assert again["accepted"] == 6, "room again once drained"
        run_worker()
    accepted = [*ids(first, again), single.json()["job_id"], last.json()["job_id"]]
    judge(bounded, "queue full: a 3-file request refused (429)", accepted, completions)


def test_urgent_jobs_overtake_routine_ones(
    client: TestClient, settings: Settings, run_worker, completions
) -> None:
    routine = submit(client, thirty_two() + thirty_two()[:16])
    urgent = submit(client, thirty_two()[:8], priority="urgent")
    run_worker(max_batch_size=4)
    jobs = db_jobs(settings)
    by_id = {str(j.id): j for j in jobs}
    urgent_jobs = [by_id[j["job_id"]] for j in urgent["jobs"]]
    routine_jobs = [by_id[j["job_id"]] for j in routine["jobs"]]
    assert all(j.state == "done" for j in jobs)
    # Submitted last, started first: every urgent job ran before any routine one.
    assert max(j.started_at for j in urgent_jobs) <= min(j.started_at for j in routine_jobs)  # type: ignore[type-var]
    wait_urgent = statistics.mean(j.queue_wait_ms or 0 for j in urgent_jobs)
    wait_routine = statistics.mean(j.queue_wait_ms or 0 for j in routine_jobs)
    print(f"queue wait: urgent {wait_urgent:.0f} ms, routine {wait_routine:.0f} ms (mean)")
    assert wait_urgent < wait_routine
    judge(
        settings,
        "8 urgent submitted behind 48 routine",
        ids(routine, urgent),
        completions,
        urgent_wait_ms=round(wait_urgent),
        routine_wait_ms=round(wait_routine),
    )


def test_while_the_queue_is_down_nothing_is_accepted_or_kept(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 for one file as for several, a caller that waits (whose image is announced to
    the workers in the same first round trip) included; one file's PUT, which runs while
    Redis is asked, leaves no object behind."""
    import redis

    from hepato.devstack.localstack import free_port

    # Every command the gateway sends is refused, as by a Redis that is down.
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    monkeypatch.setattr(client.app.state.resources, "redis", dead)  # type: ignore[attr-defined]
    stored = objects(settings)
    for path, files in (
        ("/v1/jobs", {"file": ("a.png", thirty_two()[0].read_bytes())}),
        ("/v1/predict", {"file": ("b.png", thirty_two()[1].read_bytes())}),
        ("/v1/batches", upload(thirty_two()[:2])),
    ):
        response = client.post(path, files=files)
        assert response.status_code == 503, (path, response.text)
    assert db_jobs(settings) == [] and objects(settings) == stored
