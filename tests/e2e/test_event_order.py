"""The job event log without a global lock, on real Postgres: events that commit out of
id order are still read, in one order, none skipped; a batch's or a job's finish is seen
once under concurrent writers; only batches whose end does something take a lock."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, select, text, update

from hepato.common import event_log
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job, JobEvent, WebhookDelivery
from hepato.common.tenants import PUBLIC_TENANT


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    yield get_engine(settings.database_url)


def make_batch(engine: Engine, n: int, callback_url: str | None = None) -> list[uuid.UUID]:
    """A batch of ``n`` pending jobs (rows only: no image, no queue); their ids."""
    batch_id, ids = uuid.uuid4(), [uuid.uuid4() for _ in range(n)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant, model, priority, total, callback_url) "
                "VALUES (:id, :tenant, 'hepato-yolov8n', 'routine', :n, :url)"
            ),
            {"id": batch_id, "tenant": PUBLIC_TENANT, "n": n, "url": callback_url},
        )
        conn.execute(
            text("""
                INSERT INTO jobs (id, batch_id, tenant, filename, object_key, image_format,
                                  size_bytes, width, height, model, task, priority, state,
                                  attempts, max_attempts)
                SELECT unnest(CAST(:ids AS uuid[])), :batch, :tenant, 'a.png', 'k/a.png',
                       'png', 1000, 64, 64, 'hepato-yolov8n', 'detect', 'routine', 'pending',
                       0, 3
            """),
            {"ids": ids, "batch": batch_id, "tenant": PUBLIC_TENANT},
        )
    return ids


def batch_of(engine: Engine, job_id: uuid.UUID) -> uuid.UUID:
    with engine.connect() as conn:
        return conn.execute(select(Job.batch_id).where(Job.id == job_id)).scalar_one()


def move(conn: Connection, job_id: uuid.UUID, state: str) -> None:
    """A transition as the services write one: the change, then its event."""
    conn.execute(update(Job).where(Job.id == job_id).values(state=state))
    event_log.record(conn, [job_id])


def commit_now(engine: Engine, job_id: uuid.UUID, state: str) -> None:
    with event_log.transaction(engine) as conn:
        # Had the writer to queue behind the open transaction (a global lock), the
        # test would fail here rather than hang.
        conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        move(conn, job_id, state)


def read_all(engine: Engine, batch_id: uuid.UUID, after: event_log.Cursor) -> event_log.Read:
    with engine.connect() as conn:
        return event_log.read(conn, after, batch_id=batch_id)


def stored_id(engine: Engine, job_id: uuid.UUID, state: str) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.state == state)
        ).scalar_one()


@pytest.mark.parametrize("older_writes_first", [True, False])
def test_an_event_committed_after_one_with_a_larger_id_is_not_skipped(
    engine: Engine, older_writes_first: bool
) -> None:
    """T1 draws event id n and stays open; T2 draws n + 1 and commits. A reader then must
    not pass T1's event for good: it either holds T2's back until T1 ends, or (T1 the
    younger transaction) sends T2's and later T1's above it."""
    first, j1, j2 = make_batch(engine, 3)
    batch_id = batch_of(engine, j1)
    commit_now(engine, first, "processing")
    start = read_all(engine, batch_id, event_log.START)
    assert [e.job_id for e in start.events] == [first] and not start.held
    cursor = start.events[-1].cursor

    with engine.connect() as t1:
        t1.begin()
        if older_writes_first:
            t1.execute(text("SELECT pg_current_xact_id()"))  # T1 is the older transaction
        else:
            t2_began, commit_now_later = threading.Event(), threading.Event()

            def older_t2() -> None:
                # T2 draws its xid before T1 does, and its event id after T1's.
                with event_log.transaction(engine) as t2:
                    t2.execute(text("SELECT pg_current_xact_id()"))
                    t2_began.set()
                    commit_now_later.wait()
                    move(t2, j2, "processing")

            t2_thread = threading.Thread(target=older_t2)
            t2_thread.start()
            t2_began.wait()
        move(t1, j1, "processing")  # draws id n, stays open
        if older_writes_first:
            commit_now(engine, j2, "processing")  # draws n + 1, commits
        else:
            commit_now_later.set()
            t2_thread.join()
        assert (
            stored_id(engine, j2, "processing")
            > t1.execute(select(JobEvent.id).where(JobEvent.job_id == j1)).scalar_one()
        )

        seen = read_all(engine, batch_id, cursor)
        if older_writes_first:
            # T2's event is committed but below a running transaction: held back.
            assert seen.events == [] and seen.held
        else:
            # T2 is the older: nothing runs below it, so its event may be sent now.
            assert [e.job_id for e in seen.events] == [j2] and not seen.held
            cursor = seen.events[-1].cursor
        t1.commit()

    rest = read_all(engine, batch_id, cursor)
    expected = [j1, j2] if older_writes_first else [j1]
    assert [e.job_id for e in rest.events] == expected and not rest.held
    # Every event of the batch read once, in one order: the stored log.
    with engine.connect() as conn:
        log = conn.execute(
            select(JobEvent.job_id)
            .where(JobEvent.batch_id == batch_id)
            .order_by(JobEvent.xid, JobEvent.id)
        ).scalars()
        whole = event_log.read(conn, event_log.START, batch_id=batch_id).events
        assert [e.job_id for e in whole] == list(log)


_ADVISORY = text("SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND pid = :p")


def advisory_locks(engine: Engine, pid: int) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [
            (classid, objid)
            for classid, objid in conn.execute(
                text(
                    "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND pid = :p"
                ),
                {"p": pid},
            )
        ]


@pytest.mark.parametrize("callback", [None, "http://receiver.invalid/hook"])
def test_only_a_batch_whose_end_does_something_takes_a_lock(
    engine: Engine, callback: str | None
) -> None:
    (job_id,) = make_batch(engine, 1, callback)
    with engine.connect() as conn:
        conn.begin()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        move(conn, job_id, "processing")
        assert advisory_locks(engine, pid) == [], "no lock for a job that does not end"
        move(conn, job_id, "done")
        held = advisory_locks(engine, pid)
        conn.rollback()
    if callback is None:
        assert held == [], "a batch without webhook ends without any lock"
    else:
        assert len(held) == 1, held


def test_concurrent_writers_of_a_batch_s_last_jobs_queue_its_webhook_once(
    engine: Engine,
) -> None:
    """Eight transactions end the eight jobs of a batch at once, each having changed its
    job before any checks: one of them, exactly, must see the batch end."""
    ids = make_batch(engine, 8, "http://receiver.invalid/hook")
    batch_id = batch_of(engine, ids[0])
    changed = threading.Barrier(len(ids))
    errors: list[BaseException] = []

    def finish(job_id: uuid.UUID) -> None:
        try:
            with event_log.transaction(engine) as conn:
                conn.execute(update(Job).where(Job.id == job_id).values(state="done"))
                changed.wait()
                event_log.record(conn, [job_id])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(job_id,)) for job_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine.connect() as conn:
        rows = conn.execute(select(WebhookDelivery.id)).scalars().all()
    assert rows == [f"msg_{batch_id.hex}"]


def test_a_legacy_integer_last_event_id_resumes_where_it_was(
    engine: Engine, client: TestClient
) -> None:
    """Ids sent before events named their transaction were bare integers; those events
    have xid 0 now, so ``N`` is the cursor (0, N): nothing after it is lost or repeated."""
    (job_id,) = make_batch(engine, 1)
    with engine.begin() as conn:
        for state in ("pending", "processing"):
            conn.execute(
                text(
                    "INSERT INTO job_events (job_id, batch_id, tenant, state, xid) "
                    "SELECT id, batch_id, tenant, :state, '0' FROM jobs WHERE id = :id"
                ),
                {"state": state, "id": job_id},
            )
    legacy = stored_id(engine, job_id, "pending")
    commit_now(engine, job_id, "done")
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(legacy)}
    ) as stream:
        assert stream.status_code == 200
        body = stream.read().decode()
    ids = [line.removeprefix("id: ") for line in body.splitlines() if line.startswith("id: ")]
    states = [line for line in body.splitlines() if line.startswith("data: ")]
    assert len(ids) == 2 and '"processing"' in states[0] and '"done"' in states[1]
    assert ids[0] == f"0-{stored_id(engine, job_id, 'processing')}"
    assert event_log.parse_cursor(ids[1])[0] > 0
    # Resuming from the new form of the same id gives the same tail.
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ids[0]}
    ) as stream:
        tail = stream.read().decode()
    assert f"id: {ids[1]}" in tail and f"id: {ids[0]}" not in tail


def test_a_stream_does_not_end_while_its_last_events_are_held_back(engine: Engine) -> None:
    """The batch's last job is done and committed, but behind an older transaction still
    running: its counts say finished, its event is not readable yet. The stream must not
    close on those counts (it would never send that event) but look again."""
    from hepato.gateway.routes.live import Scope, _read

    (job_id,) = make_batch(engine, 1)
    scope = Scope(batch_id=batch_of(engine, job_id))
    with engine.connect() as older:
        older.begin()
        older.execute(text("SELECT pg_current_xact_id()"))
        commit_now(engine, job_id, "done")
        page = _read(engine, scope, event_log.START, True)
        assert page.events == [] and page.held and page.counts is None
        older.rollback()
    page = _read(engine, scope, event_log.START, True)
    assert [e.state for e in page.events] == ["done"] and not page.held
    assert page.counts is not None and page.counts["done"] == 1


def test_event_ids_parse_in_both_forms_and_nothing_else() -> None:
    assert event_log.parse_cursor("41") == (0, 41)
    assert event_log.parse_cursor("7-41") == (7, 41)
    assert event_log.format_cursor((7, 41)) == "7-41"
    for bad in ("", "x", "-1", "1-2-3", "7-", "1e3", str(2**63), f"{2**64}-1", "٣"):
        with pytest.raises(ValueError):
            event_log.parse_cursor(bad)


def test_a_microbatch_complete_is_one_statement_with_its_events(engine: Engine) -> None:
    """The results, the state and the events of a microbatch go in one statement, and
    nothing else is sent for a batch whose end does nothing; a job another worker has
    taken over is neither written nor logged."""
    from sqlalchemy import event

    from hepato.common import jobs
    from hepato.common.results import DetectResult

    ids = make_batch(engine, 4)
    token, other = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            update(Job).where(Job.id.in_(ids)).values(state="processing", lease_token=token)
        )
        conn.execute(update(Job).where(Job.id == ids[3]).values(lease_token=other))
    statements: list[str] = []

    def seen(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        statements.append(sql)

    def results(of: list[uuid.UUID]) -> list[jobs.JobResult]:
        return [
            jobs.JobResult(j, DetectResult(boxes=[]), batch_size=3, inference_ms=1.0) for j in of
        ]

    # The first microbatch of a batch also asks whether its end does something (a
    # webhook, a slide); each process asks that once per batch.
    assert jobs.complete(engine, token, results(ids[:1]), "1") == {ids[0]}
    event.listen(engine, "before_cursor_execute", seen)
    try:
        written = jobs.complete(engine, token, results(ids[1:]), "1")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert written == set(ids[1:3])
    assert len(statements) == 1, statements
    assert " ".join(statements[0].split()).startswith("WITH changed AS (UPDATE jobs")
    with engine.connect() as conn:
        logged = conn.execute(
            select(JobEvent.job_id).where(JobEvent.job_id.in_(ids), JobEvent.state == "done")
        ).scalars()
        assert set(logged) == set(ids[:3])
        states = dict(conn.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())
    assert [states[j] for j in ids] == ["done", "done", "done", "processing"]
