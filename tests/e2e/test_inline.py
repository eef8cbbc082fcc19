"""Small images travel to their worker through Redis with their job id (the object store
keeps the original): the worker then downloads nothing, and falls back to the store when
the inline copy is gone. Real Postgres, Redis and S3."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from hepato.common.constants import inline_key
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from tests.conftest import SAMPLES
from tests.e2e.conftest import images

pytestmark = pytest.mark.slow


def submit(client: TestClient, count: int) -> list[str]:
    files = [
        ("files", (p.name, p.read_bytes(), "image/png"))
        for p in images(SAMPLES, "synthetic_*.png")[:count]
    ]
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    return [j["job_id"] for j in response.json()["jobs"]]


def job(settings: Settings, job_id: str) -> Job:
    with Session(get_engine(settings.database_url)) as session:
        found = session.scalars(select(Job).where(Job.id == uuid.UUID(job_id))).one()
        session.expunge(found)
        return found


def test_an_inline_image_runs_without_the_store(
    client: TestClient, settings: Settings, run_worker: Callable[..., object]
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    [job_id] = submit(client, 1)
    sent = r.get(inline_key(job_id))
    stored = job(settings, job_id)
    assert sent == ObjectStore(settings).get(stored.object_key), "the same bytes as stored"
    # Gone from the store: only the inline copy can have reached the model.
    ObjectStore(settings).client.remove_object(settings.s3_bucket, stored.object_key)
    run_worker()
    assert job(settings, job_id).state == "done"
    assert not r.exists(inline_key(job_id)), "taken once: a retry reads the store"


def test_without_its_inline_copy_the_image_is_downloaded(
    client: TestClient, settings: Settings, run_worker: Callable[..., object]
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    first, second = submit(client, 2)
    r.delete(inline_key(first))  # expired, or Redis restarted
    run_worker()
    assert job(settings, first).state == "done"
    assert job(settings, second).state == "done"


def test_a_long_queue_or_a_large_image_goes_through_the_store_only(settings: Settings) -> None:
    from hepato.gateway.app import create_app

    r = redis.Redis.from_url(settings.redis_url)
    for update in ({"inline_max_queued": 1}, {"inline_max_bytes": 1024}):
        with TestClient(create_app(settings.model_copy(update=update))) as client:
            job_ids = submit(client, 2)
        assert not any(r.exists(inline_key(j)) for j in job_ids), update


def test_an_inline_image_is_taken_and_decoded_while_its_claim_runs(
    client: TestClient,
    settings: Settings,
    run_worker: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone real-time job waits for the longer of its claim and its decode, not their
    sum: the claim finds its image already taken from Redis (and on its way through the
    decoder)."""
    from hepato.worker import microbatch

    r = redis.Redis.from_url(settings.redis_url)
    [job_id] = submit(client, 1)
    real_claim, taken_first = microbatch.claim_jobs, list[bool]()

    def claim(engine: object, ids: list[str], *args: object, **kwargs: object) -> object:
        deadline = time.monotonic() + 5.0
        while r.exists(inline_key(job_id)) and time.monotonic() < deadline:
            time.sleep(0.01)
        taken_first.append(not r.exists(inline_key(job_id)))
        return real_claim(engine, ids, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(microbatch, "claim_jobs", claim)
    run_worker()
    assert taken_first == [True]
    done = job(settings, job_id)
    assert done.state == "done" and done.result is not None
