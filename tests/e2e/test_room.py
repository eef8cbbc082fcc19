"""Queue bounds (common.room) on real Postgres: read from the counts the triggers keep,
so the check reads no ``jobs`` table whatever the queue's length, and it still follows
every job that is added, claimed or canceled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text, update

from hepato.common import claim, room
from hepato.common.constants import PUBLIC_TENANT
from hepato.common.db import get_engine
from hepato.common.exceptions import QueueFull
from hepato.common.settings import Settings
from hepato.common.tables import Job
from tests.e2e.test_event_order import make_batch
from tests.e2e.test_job_state_counts import explained

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
