"""The README's "the sweeper returns expired leases to the queue, or to ``failed`` after
``max_attempts``; many copies are safe": a job whose every claim dies with its worker
(SIGKILL, lease left to expire) is failed once, after exactly ``max_attempts`` claims,
while four sweepers run at once (three workers serving another model, and each dying
worker's own)."""

from __future__ import annotations

import json
import signal
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from hepato.common.db import session_factory
from hepato.common.settings import Settings
from hepato.common.tables import JobEvent
from tests.chaos import poison
from tests.chaos.conftest import Spawned, judge, wait_for
from tests.e2e.test_pipeline import db_jobs

pytestmark = pytest.mark.slow


def test_a_job_whose_claims_all_die_is_failed_once_after_max_attempts(
    client: TestClient, settings: Settings, spawn_worker, completions
) -> None:
    # Sweepers only: they serve a model no job here is for, so they never claim it.
    sweepers = [
        spawn_worker(f"sweeper-{i}", HEPATO_WORKER_MODELS=json.dumps(["null"])) for i in range(3)
    ]
    for s in sweepers:
        s.wait_ready(settings.redis_url)
    files = {"file": ("dies.png", poison.png(pixel=poison.DEATH_PIXEL), "image/png")}
    response = client.post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    job_id = uuid.UUID(response.json()["job_id"])
    max_attempts = response.json().get("max_attempts", settings.max_attempts)

    def job():  # type: ignore[no-untyped-def]
        return next(j for j in db_jobs(settings) if j.id == job_id)

    dead: list[Spawned] = []
    # One dying worker at a time: it claims the job, and its model kills it.
    while job().state not in ("failed", "done"):
        assert len(dead) < max_attempts + 2, f"still {job().state} after {len(dead)} deaths"
        dier = spawn_worker(f"dier-{len(dead)}", module="tests.chaos.die_on_poison")
        code = dier.proc.wait(timeout=90)
        assert code == -signal.SIGKILL, dier.log_text()
        dead.append(dier)
        # Its lease runs out; a sweeper returns the job to the queue, or fails it.
        wait_for(
            "the lease to be swept",
            lambda: job().state in ("pending", "failed"),
            timeout_s=settings.lease_s * 4,
            every_s=0.1,
        )

    final = job()
    assert (final.state, final.attempts) == ("failed", max_attempts), final
    assert len(dead) == max_attempts, "one claim per death, none after the last"
    with session_factory(settings.database_url)() as session:
        events = [
            e.state
            for e in session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        ]
    # Each claim and each return shows once: no two sweepers returned (or failed) the
    # same expired lease.
    print(f"events: {events}")
    assert events == [*["pending", "processing"] * max_attempts, "failed"], events
    for s in sweepers:
        assert s.proc.poll() is None, s.log_text()
    judge(
        settings,
        f"a job whose worker dies at every claim, 4 sweepers running: failed after "
        f"{max_attempts} lease expiries",
        [str(job_id)],
        completions,
        in_flight=1,
    )
