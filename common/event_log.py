"""The job event log: one ``job_events`` row per state change, written in the same
transaction as the change, and a Redis wake-up published after the commit.

Postgres is the truth; the wake-up only saves readers latency. Readers re-read the table
on every wake-up and at a bounded interval, so a lost publish (Redis down, flushed,
restarted) delays an event and never drops it.

Why the advisory lock: a bigserial is drawn at insert time but becomes visible at
commit, so without it a reader could see id 11 before id 10 commits and move its cursor
past 10 for good. Each writer takes one transaction-scoped lock in its insert (the last
statement of its transaction), so ids commit in the order they were drawn and
what a reader sees is always a prefix of the log."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import ColumnElement, Connection, Engine, func, insert, select, true

from hepato.common import slide_finish, webhooks
from hepato.common.constants import (
    TERMINAL_STATES,
    batch_events_channel,
    job_events_channel,
    job_finished_channel,
)
from hepato.common.tables import Job, JobEvent

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every writer.
_LOG_LOCK_KEY = 4711002
_WAKE = "hepato.events.wake"

# Which Redis each engine's writers publish on (set once per process by gateway and worker).
_publishers: dict[Engine, redis.Redis] = {}


def attach(engine: Engine, client: redis.Redis) -> None:
    """Publish wake-ups for commits on ``engine`` through ``client``. Without it events
    are still written; readers then see them at their interval re-read."""
    _publishers[engine] = client


def record(
    conn: Connection, job_ids: Collection[uuid.UUID], *, where: ColumnElement[bool] | None = None
) -> None:
    """Log the current state of ``job_ids`` (as this transaction left them) as one event
    each. Call once per transition, after its writes, inside ``transaction``. ``where``
    instead of ids names a set too large for a parameter list (a slide's tiles, created
    together); their wake-ups go to their batch's channel only, as no one can be
    watching jobs whose ids were never published."""
    if where is None:
        if not job_ids:
            return
        where = Job.id.in_(list(job_ids))
        per_job = True
    else:
        per_job = False
    # The lock joins the insert's SELECT (one round trip, not two): it is taken before
    # the first row is produced, so before any id is drawn.
    lock = select(func.pg_advisory_xact_lock(_LOG_LOCK_KEY).label("held")).subquery("log_lock")
    rows = conn.execute(
        insert(JobEvent)
        .from_select(
            ["job_id", "batch_id", "tenant", "state", "error", "at"],
            select(Job.id, Job.batch_id, Job.tenant, Job.state, Job.error, func.now())
            .select_from(Job)
            .join(lock, true())
            .where(where)
            .order_by(Job.id),
        )
        .returning(JobEvent.job_id, JobEvent.batch_id, JobEvent.state)
    ).all()
    recorded = [(job, batch, state) for job, batch, state in rows]
    webhooks.enqueue_finished(conn, recorded)
    # Under the same lock: the last tile of a slide is seen ending by exactly one writer.
    slide_finish.finish_slides(conn, recorded)
    wake = conn.info.setdefault(_WAKE, set())
    wake.update(batch_events_channel(str(batch_id)) for _, batch_id, _ in rows if batch_id)
    if per_job:
        wake.update(job_events_channel(str(job_id)) for job_id, _, _ in rows)
        wake.update(
            job_finished_channel(str(job_id))
            for job_id, batch_id, state in rows
            if batch_id is None and state in TERMINAL_STATES
        )


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` that publishes the wake-ups of the events recorded in it once
    it has committed (never before: a reader woken early would find nothing new)."""
    channels: set[str] = set()
    with engine.begin() as conn:
        try:
            yield conn
        finally:
            # Pooled connections keep .info: clear it even when the transaction fails.
            channels = conn.info.pop(_WAKE, set())
    publish(engine, channels)


def publish(engine: Engine, channels: Collection[str]) -> None:
    client = _publishers.get(engine)
    if client is None or not channels:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for channel in sorted(channels):
            pipe.publish(channel, "1")
        pipe.execute()
    except redis.RedisError:
        log.debug("wake-up not published; readers catch up at their interval", exc_info=True)


@dataclass(frozen=True)
class Event:
    id: int
    job_id: uuid.UUID
    batch_id: uuid.UUID | None
    state: str
    error: str | None
    at: datetime

    def data(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "batch_id": str(self.batch_id) if self.batch_id else None,
            "state": self.state,
            "error": self.error,
            "at": self.at.isoformat(),
        }


def read(
    conn: Connection,
    after: int,
    *,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    limit: int = 1000,
) -> list[Event]:
    """Events of one job or one batch with ids above ``after``, oldest first."""
    scope = JobEvent.job_id == job_id if job_id is not None else JobEvent.batch_id == batch_id
    rows = conn.execute(
        select(
            JobEvent.id,
            JobEvent.job_id,
            JobEvent.batch_id,
            JobEvent.state,
            JobEvent.error,
            JobEvent.at,
        )
        .where(scope, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()
    return [Event(*row) for row in rows]
