"""Queue bounds (common.room) on real Postgres: read from the counts the triggers keep,
so the check reads no ``jobs`` table whatever the queue's length, and it still follows
every job that is added, claimed or canceled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, select, text, update

from hepato.common import audit, claim, job_state_counts, jobs, room
from hepato.common.audit import Action, Caller, ObjectType
from hepato.common.constants import PUBLIC_TENANT, Priority
from hepato.common.db import get_engine
from hepato.common.exceptions import QueueFull
from hepato.common.manifest import ModelManifest, load_registry
from hepato.common.settings import Settings
from hepato.common.tables import AuditEvent, Job, JobEvent
from tests.e2e.test_event_order import make_batch
from tests.e2e.test_job_state_counts import explained, new_jobs

MODEL = "hepato-yolov8n"  # make_batch's


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    yield get_engine(settings.database_url)


def test_the_bounds_read_no_jobs_table(engine: Engine) -> None:
    make_batch(engine, 50)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE jobs"))
    statements: list[tuple[str, Any]] = []

    def seen(conn: Connection, cursor: object, sql: str, parameters: Any, *args: object) -> None:
        statements.append((sql, parameters))

    bounds = room.Room(per_model=1000, per_tenant=1000, retry_after_s=1)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert room.check_room(engine, MODEL, PUBLIC_TENANT, 1, bounds) == 50
        with engine.begin() as conn:
            assert room.hold_room(conn, MODEL, PUBLIC_TENANT, 1, bounds) == 50
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    # Each is a call of the functions of migration 0016, and what they count from is
    # the body of hepato_pending: its plan is the one to read.
    calls = [sql for sql, _ in statements]
    assert len(calls) == 2 and "hepato_pending" in calls[0] and "hepato_hold_room" in calls[1]
    with engine.connect() as conn:
        tables = {"jobs"} | set(
            conn.execute(text("SELECT relid::regclass::text FROM pg_partition_tree('jobs')"))
            .scalars()
            .all()
        )
        body = conn.execute(
            text("SELECT prosrc FROM pg_proc WHERE proname = 'hepato_pending'")
        ).scalar_one()
        query = body.replace("p_model", "%(model)s").replace("p_tenant", "%(tenant)s")
        read = explained(conn, query, {"model": MODEL, "tenant": PUBLIC_TENANT})
    assert read and not read & tables, read
    assert {"job_state_counts", "job_state_deltas"} <= read


def test_the_bounds_follow_new_claimed_and_canceled_jobs(engine: Engine) -> None:
    ids = make_batch(engine, 5)
    bounds = room.Room(per_model=6, per_tenant=6, retry_after_s=1)
    assert room.check_room(engine, MODEL, PUBLIC_TENANT, 1, bounds) == 5
    with pytest.raises(QueueFull, match="5 of 6 jobs pending"):
        room.check_room(engine, MODEL, PUBLIC_TENANT, 2, bounds)
    tenant_bound = room.Room(per_model=100, per_tenant=5, retry_after_s=1)
    with pytest.raises(QueueFull, match="holds 5 of its share of 5"):
        room.check_room(engine, MODEL, PUBLIC_TENANT, 1, tenant_bound)
    assert room.check_room(engine, MODEL, "another-lab", 1, tenant_bound) == 5
    claim.claim(engine, ids[:2], "w1", 30.0)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[2]).values(state="canceled"))
    assert room.check_room(engine, MODEL, PUBLIC_TENANT, 4, bounds) == 2


@pytest.fixture
def manifest(settings: Settings) -> ModelManifest:
    return load_registry(settings.models_dir)[settings.default_model]


def lone(engine: Engine, manifest: ModelManifest, bounds: room.Room, **kw: Any) -> jobs.Created:
    """One job without a batch, submitted as the gateway's real-time path does."""
    caller = Caller(PUBLIC_TENANT, None, "test")
    return jobs.create(
        engine,
        new_jobs(1),
        as_batch=False,
        tenant=PUBLIC_TENANT,
        model=manifest,
        priority=Priority.urgent,
        max_attempts=2,
        deadline_s=None,
        question=None,
        callback_url=None,
        room=bounds,
        audit_row=lambda _, ids: audit.row(caller, Action.submit, ObjectType.job, ids[0]),
        **kw,
    )


def test_a_lone_job_holds_its_room_and_is_written_in_one_statement(
    engine: Engine, manifest: ModelManifest
) -> None:
    """The room, the row, its first event and the audit row: one statement, committed by
    itself (no BEGIN, no COMMIT); with a PUT to wait for, in a transaction that waits."""
    bounds = room.Room(per_model=3, per_tenant=3, retry_after_s=1)
    sent: list[tuple[str, bool]] = []

    def seen(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        sent.append((sql, conn.connection.dbapi_connection.autocommit))  # type: ignore[union-attr]

    event.listen(engine, "before_cursor_execute", seen)
    try:
        first = lone(engine, manifest, bounds)
        waited: list[bool] = []
        second = lone(engine, manifest, bounds, before_commit=lambda: waited.append(True))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert [autocommit for _, autocommit in sent] == [True, False] and waited == [True]
    assert all("hepato_hold_room" in sql and "audit_events" in sql for sql, _ in sent)
    assert (first.queued_before, second.queued_before) == (0, 1)
    ids = [*first.job_ids, *second.job_ids]
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.object_id.in_(ids))
            ).scalar_one()
            == 2
        )
        assert (
            conn.execute(
                select(func.count()).select_from(JobEvent).where(JobEvent.job_id.in_(ids))
            ).scalar_one()
            == 2
        )
    with pytest.raises(QueueFull, match=r"is full \(2 of 2 jobs pending; this request adds 1\)"):
        lone(engine, manifest, room.Room(per_model=2, per_tenant=3, retry_after_s=1))


def test_lone_jobs_submitted_together_never_pass_the_bound(
    engine: Engine, manifest: ModelManifest
) -> None:
    """Eight at once against room for five: the statement's lock is taken before its
    count, which sees what the lock's previous holder committed."""
    bounds = room.Room(per_model=5, per_tenant=5, retry_after_s=1)
    together = threading.Barrier(8, timeout=30)

    def one() -> str:
        together.wait()
        try:
            lone(engine, manifest, bounds)
        except QueueFull:
            return "refused"
        return "accepted"

    with ThreadPoolExecutor(8) as pool:
        answers = sorted(pool.map(lambda _: one(), range(8)))
    assert answers == ["accepted"] * 5 + ["refused"] * 3
    with engine.connect() as conn:
        assert job_state_counts.pending(conn, manifest.name, PUBLIC_TENANT) == (5, 5)
