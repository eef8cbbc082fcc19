"""Creating and claiming jobs on real Postgres: new jobs are inserted with their first
events in one statement; the usual microbatch is claimed with its events in one
statement; a job tried before, one past its deadline, one still in its backoff and ids
no longer pending are each handled as before the fast claim."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, event, select, text, update

from hepato.common import claim
from hepato.common.db import get_engine
from hepato.common.manifest import load_registry
from hepato.common.settings import Settings
from hepato.common.tables import Job, JobEvent
from hepato.worker.backends.base import Model
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_event_order import make_batch
from tests.e2e.test_job_state_counts import submit


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    yield get_engine(settings.database_url)


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def seen(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        statements.append(sql)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def states(engine: Engine, ids: list[uuid.UUID]) -> list[str]:
    with engine.connect() as conn:
        found = dict(conn.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())
    return [found[j] for j in ids]


def logged(engine: Engine, ids: list[uuid.UUID]) -> list[tuple[uuid.UUID, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobEvent.job_id, JobEvent.state)
            .where(JobEvent.job_id.in_(ids))
            .order_by(JobEvent.id)
        ).all()
    return [(job, state) for job, state in rows]


def set_jobs(engine: Engine, ids: list[uuid.UUID], sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE jobs SET {sql} WHERE id = ANY(:ids)"), {"ids": ids})


def test_a_fresh_microbatch_is_claimed_with_its_events_in_one_statement(
    engine: Engine,
) -> None:
    ids = make_batch(engine, 4)
    with counted(engine) as statements:
        token, claimed, left = claim.claim(engine, [str(j) for j in ids], "w1", 30.0)
    assert len(statements) == 1, statements
    assert " ".join(statements[0].split()).startswith("WITH changed AS (UPDATE jobs")
    assert sorted(job.id for job in claimed) == sorted(ids) and left == []
    assert all(job.attempts == 1 and job.object_key == "k/a.png" for job in claimed)
    assert all(job.queue_wait_ms is not None and job.created_at for job in claimed)
    assert states(engine, ids) == ["processing"] * 4
    assert sorted(logged(engine, ids)) == sorted((j, "processing") for j in ids)
    with engine.connect() as conn:
        tokens = set(conn.execute(select(Job.lease_token).where(Job.id.in_(ids))).scalars())
    assert tokens == {token}


def test_a_job_tried_before_popped_first_runs_alone(engine: Engine) -> None:
    ids = make_batch(engine, 3)
    set_jobs(engine, ids[:1], "attempts = 1")
    _, claimed, left = claim.claim(engine, ids, "w1", 30.0)
    assert [job.id for job in claimed] == ids[:1]
    assert [r.id for r in left] == ids[1:] and all(r.delay_s == 0 for r in left)
    assert states(engine, ids) == ["processing", "pending", "pending"]
    assert logged(engine, ids) == [(ids[0], "processing")]


def test_fresh_jobs_popped_before_one_tried_before_run_without_it(engine: Engine) -> None:
    ids = make_batch(engine, 3)
    set_jobs(engine, ids[2:], "attempts = 1")
    _, claimed, left = claim.claim(engine, ids, "w1", 30.0)
    assert sorted(job.id for job in claimed) == sorted(ids[:2])
    assert [r.id for r in left] == ids[2:]
    assert states(engine, ids) == ["processing", "processing", "pending"]


def test_an_overdue_job_expires_and_the_others_run(engine: Engine) -> None:
    ids = make_batch(engine, 3)
    set_jobs(engine, ids[1:2], "deadline_at = now() - interval '1 second'")
    _, claimed, left = claim.claim(engine, ids, "w1", 30.0)
    assert sorted(job.id for job in claimed) == sorted([ids[0], ids[2]]) and left == []
    assert states(engine, ids) == ["processing", "expired", "processing"]
    assert (ids[1], "expired") in logged(engine, ids)


def test_a_job_in_its_backoff_goes_back_with_what_is_left_of_it(engine: Engine) -> None:
    ids = make_batch(engine, 2)
    set_jobs(engine, ids[1:], "not_before = now() + interval '30 seconds'")
    _, claimed, left = claim.claim(engine, ids, "w1", 30.0)
    assert [job.id for job in claimed] == ids[:1]
    assert [r.id for r in left] == ids[1:] and 20 < left[0].delay_s <= 30
    assert states(engine, ids) == ["processing", "pending"]


def test_ids_no_longer_pending_duplicates_and_garbage_are_dropped(engine: Engine) -> None:
    ids = make_batch(engine, 3)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[1]).values(state="canceled"))
    popped = [str(ids[0]), "not-a-uuid", str(ids[1]), str(ids[0]), str(uuid.uuid4()), ids[2]]
    _, claimed, left = claim.claim(engine, popped, "w1", 30.0)
    assert sorted(job.id for job in claimed) == sorted([ids[0], ids[2]]) and left == []
    assert states(engine, ids) == ["processing", "canceled", "processing"]
    # Claimed again (popped twice, by two workers): nothing, and nothing logged twice.
    _, again, _ = claim.claim(engine, [ids[0]], "w2", 30.0)
    assert again == []
    assert logged(engine, [ids[0]]) == [(ids[0], "processing")]


def test_new_jobs_and_their_first_events_are_one_statement(
    engine: Engine, settings: Settings
) -> None:
    model = load_registry(settings.models_dir)[settings.default_model]
    with counted(engine) as statements:
        job_ids = submit(engine, model, 3)
    flat = [" ".join(sql.split()) for sql in statements]
    assert [sql.split(" (")[0] for sql in flat] == ["INSERT INTO batches", "WITH changed AS"]
    assert flat[1].startswith("WITH changed AS (INSERT INTO jobs")
    assert states(engine, job_ids) == ["pending"] * 3
    assert sorted(logged(engine, job_ids)) == sorted((j, "pending") for j in job_ids)


def test_jobs_whose_end_does_nothing_more_are_completed_in_one_autocommitted_statement(
    engine: Engine,
) -> None:
    """A claim tells which jobs end alone (no webhook of their own, no batch whose end
    does something); their results, state and events are one statement sent outside a
    transaction (no BEGIN, no webhook read, no COMMIT round trips)."""
    from hepato.common import jobs
    from hepato.common.results import DetectResult

    ids = make_batch(engine, 3)
    set_jobs(engine, ids, "batch_id = NULL")
    set_jobs(engine, ids[2:], "callback_url = 'https://example.org/hook'")
    token, claimed, _ = claim.claim(engine, [str(j) for j in ids], "w1", 30.0)
    by_id = {job.id: job for job in claimed}
    assert [by_id[j].has_callback for j in ids] == [False, False, True]
    alone = [by_id[j] for j in ids[:2]]
    assert jobs.ends_alone(alone) and not jobs.ends_alone(claimed)
    # A batch's jobs end alone once this process knows that the batch's end does nothing.
    batch = make_batch(engine, 2)
    b_token, in_batch, _ = claim.claim(engine, [str(j) for j in batch], "w1", 30.0)
    assert not jobs.ends_alone(in_batch)
    first = [jobs.JobResult(batch[0], DetectResult(boxes=[]), 1, 1.0)]
    assert jobs.complete(engine, b_token, first, "1") == {batch[0]}
    assert jobs.ends_alone(in_batch)
    hooked = make_batch(engine, 2, callback_url="https://example.org/hook")
    h_token, in_hooked, _ = claim.claim(engine, [str(j) for j in hooked], "w1", 30.0)
    first = [jobs.JobResult(hooked[0], DetectResult(boxes=[]), 1, 1.0)]
    assert jobs.complete(engine, h_token, first, "1") == {hooked[0]}
    assert not jobs.ends_alone(in_hooked), "its end queues the batch's webhook"

    autocommit: list[bool] = []

    def seen(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        autocommit.append(conn.connection.dbapi_connection.autocommit)  # type: ignore[union-attr]

    results = [jobs.JobResult(j.id, DetectResult(boxes=[]), 2, 1.0) for j in alone]
    event.listen(engine, "before_cursor_execute", seen)
    try:
        written = jobs.complete(engine, token, results, "1", alone=True)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert written == set(ids[:2])
    assert autocommit == [True]
    assert states(engine, ids) == ["done", "done", "processing"]
    assert [s for _, s in logged(engine, ids[:2])].count("done") == 2


def test_the_worker_claims_without_waiting_for_the_disk_and_writes_results_waiting(
    client: TestClient, settings: Settings, models: dict[str, Model]
) -> None:
    """A claim's commit returns before its WAL is on disk (a Postgres crash that undoes
    it leaves its jobs pending, and the fence refuses their results); the commit of a
    result, which makes the claim durable with it, waits for the disk."""
    from hepato.worker.runner import Worker

    seen: dict[str, set[str]] = {"claim": set(), "complete": set()}

    def on_execute(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        if "json_build_object" in sql:
            kind = "complete"
        elif "lease_token=" in sql and "attempts=(jobs.attempts" in sql:
            kind = "claim"
        else:
            return
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        seen[kind].add(dbapi.execute("SHOW synchronous_commit").fetchone()[0])  # type: ignore[attr-defined]

    path = images(SAMPLES, "synthetic_*.png")[0]
    response = client.post("/v1/jobs", files={"file": ("a.png", path.read_bytes())})
    assert response.status_code == 202, response.text
    event.listen(Engine, "before_cursor_execute", on_execute)
    try:
        Worker(settings, models, burst=True).run(install_signals=False)
    finally:
        event.remove(Engine, "before_cursor_execute", on_execute)
    assert seen == {"claim": {"off"}, "complete": {"on"}}
    assert client.get(f"/v1/jobs/{response.json()['job_id']}").json()["state"] == "done"


def test_only_the_usual_claim_goes_without_waiting_for_the_disk(
    engine: Engine, settings: Settings
) -> None:
    """The one statement that moves never-tried jobs to processing runs on the fast
    engine; a job tried before (claimed alone, under a lock) and an overdue one (expired:
    a state a client may be told) are written on the engine whose commits wait."""
    fast = get_engine(settings.database_url, synchronous_commit=False)
    fresh = make_batch(engine, 2)
    tried = make_batch(engine, 1)
    set_jobs(engine, tried, "attempts = 1")
    overdue = make_batch(engine, 1)
    set_jobs(engine, overdue, "deadline_at = now() - interval '1 minute'")
    writes: list[tuple[str, bool]] = []

    def seen(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        if sql.lstrip().startswith(("WITH", "UPDATE", "INSERT")):
            writes.append((sql.split()[0], conn.engine is fast))

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        _, claimed, _ = claim.claim(engine, [str(j) for j in fresh], "w1", 30.0, fast=fast)
        assert {j.id for j in claimed} == set(fresh)
        assert all(on_fast for _, on_fast in writes) and len(writes) == 1
        writes.clear()
        ids = [str(j) for j in tried + overdue]
        _, claimed, _ = claim.claim(engine, ids, "w1", 30.0, fast=fast)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert [j.id for j in claimed] == tried
    assert writes[0][1], "the usual statement first (it takes none of these)"
    assert writes[1:] and not any(on_fast for _, on_fast in writes[1:])
    assert states(engine, tried + overdue) == ["processing", "expired"]
