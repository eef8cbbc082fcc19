"""Claiming popped ids: pending jobs become ``processing`` under one fresh lease token,
the token every later write of the claim is fenced by (common.jobs ``_owned``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import (
    Connection,
    Engine,
    extract,
    func,
    select,
)

from hepato.common import event_log, job_statements
from hepato.common.constants import JobState
from hepato.common.job_statements import CLAIMED_COLUMNS
from hepato.common.jobs import ClaimedJob, Requeue, claimed_job, expire_overdue
from hepato.common.tables import Job


def claim(
    engine: Engine,
    ids: Iterable[str | uuid.UUID],
    worker_id: str,
    lease_s: float,
    *,
    fast: Engine | None = None,
) -> tuple[uuid.UUID, list[ClaimedJob], list[Requeue]]:
    """Claim the still-pending jobs among ``ids`` under one fresh lease token. Ids that
    are no longer pending (duplicates, canceled, done) are dropped; jobs whose deadline
    has passed become ``expired`` instead of running. A job tried before runs alone (see
    ``_isolate``): the pending ones left unclaimed are returned, to go back to the front
    of their queue.

    The usual microbatch (every popped job fresh, due and within its deadline) is claimed
    with its events in one statement; only what that leaves is looked at again. ``fast``:
    the engine for that one statement (the worker's, whose commits do not wait for the
    disk: that statement only moves never-tried jobs from pending to processing, which a
    Postgres crash may undo without harm); what it leaves (expiries, retries) is written
    on ``engine``."""
    job_ids = list(dict.fromkeys(_uuids(ids)))
    token = uuid.uuid4()
    if not job_ids:
        return token, [], []
    params = {"token": token, "worker_id": worker_id, "lease": timedelta(seconds=lease_s)}
    # One statement, committed by itself: the claim's only round trip, as a rule.
    with event_log.transaction(fast or engine, autocommit=True) as conn:
        rows = event_log.record_logged(
            conn, job_statements.claiming(fresh=True), {**params, "ids": job_ids}
        )
    claimed = [claimed_job(row[-len(CLAIMED_COLUMNS) :]) for row in rows]
    taken = {job.id for job in claimed}
    rest = [job_id for job_id in job_ids if job_id not in taken]
    left: list[Requeue] = []
    if not rest:
        return token, claimed, left
    # What it left (a job tried before, overdue, in its backoff, gone) as before it.
    with event_log.transaction(engine) as conn:
        overdue, chosen, left = _isolate(conn, rest)
        expired = expire_overdue(conn, overdue) if overdue else []
        if expired:
            event_log.record(conn, expired)
        if chosen:
            more = event_log.record_logged(
                conn, job_statements.claiming(fresh=False), {**params, "ids": chosen}
            )
            claimed += [claimed_job(row[-len(CLAIMED_COLUMNS) :]) for row in more]
    return token, claimed, left


def _isolate(
    conn: Connection, ids: list[uuid.UUID]
) -> tuple[list[uuid.UUID], list[uuid.UUID], list[Requeue]]:
    """Which of the popped jobs are past their deadline (to expire), which this claim
    takes, and which go back to wait.

    A retry still inside its backoff (pushed early, by a sweeper after Redis lost its
    lists) goes back to wait out the rest. A model call that hangs, or a process that
    dies in one (a segfault, the OOM killer), names no culprit: every job of its
    microbatch is tried again. So a job tried before runs in a microbatch of its own: if
    the first popped one was tried before, it is taken alone; else every fresh one is.
    Then only a poison image pays for its retries, and the jobs that shared its first
    microbatch pay one attempt each."""
    found = conn.execute(
        select(
            Job.id,
            Job.attempts,
            Job.model,
            Job.priority,
            Job.tenant,
            func.coalesce(extract("epoch", Job.not_before - func.now()), 0.0).label("wait_s"),
            func.coalesce(Job.deadline_at < func.now(), False).label("overdue"),
        ).where(Job.id.in_(ids), Job.state == JobState.pending)
    ).all()
    overdue = [row.id for row in found if row.overdue]
    rows = {row.id: row for row in found if not row.overdue}
    popped = [job_id for job_id in ids if job_id in rows]
    due = [job_id for job_id in popped if rows[job_id].wait_s <= 0]
    if not due:
        chosen = []
    elif rows[due[0]].attempts > 0:
        chosen = due[:1]
    else:
        chosen = [job_id for job_id in due if rows[job_id].attempts == 0]
    left = [
        Requeue(j, rows[j].model, rows[j].priority, rows[j].tenant, max(float(rows[j].wait_s), 0.0))
        for j in popped
        if j not in chosen
    ]
    return overdue, chosen, left


def _uuids(ids: Iterable[str | uuid.UUID]) -> list[uuid.UUID]:
    out = []
    for raw in ids:
        try:
            out.append(raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw)))
        except ValueError:
            continue  # garbage on the queue is dropped, never claimed
    return out


def pending_among(engine: Engine, ids: Iterable[str | uuid.UUID]) -> list[Requeue]:
    """The still-pending jobs among ``ids``, to push back on their own queues."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.model, Job.priority, Job.tenant).where(
                Job.id.in_(_uuids(ids)), Job.state == JobState.pending
            )
        ).all()
    return [Requeue(*row) for row in rows]
