"""Claiming popped ids: pending jobs become ``processing`` under one fresh lease token,
the token every later write of the claim is fenced by (common.jobs ``_owned``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Update,
    and_,
    exists,
    extract,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import aliased

from hepato.common import event_log
from hepato.common.constants import JobState
from hepato.common.jobs import CLAIMED_COLUMNS, ClaimedJob, Requeue, claimed_job, expire_overdue
from hepato.common.tables import Job


def claim(
    engine: Engine, ids: Iterable[str | uuid.UUID], worker_id: str, lease_s: float
) -> tuple[uuid.UUID, list[ClaimedJob], list[Requeue]]:
    """Claim the still-pending jobs among ``ids`` under one fresh lease token. Ids that
    are no longer pending (duplicates, canceled, done) are dropped; jobs whose deadline
    has passed become ``expired`` instead of running. A job tried before runs alone (see
    ``_isolate``): the pending ones left unclaimed are returned, to go back to the front
    of their queue.

    The usual microbatch (every popped job fresh, due and within its deadline) is claimed
    with its events in one statement; only what that leaves is looked at again."""
    job_ids = list(dict.fromkeys(_uuids(ids)))
    token = uuid.uuid4()
    if not job_ids:
        return token, [], []
    with event_log.transaction(engine) as conn:
        rows = event_log.record_change(
            conn, _take(token, worker_id, lease_s, job_ids, _fresh(job_ids)), *CLAIMED_COLUMNS
        )
        claimed = [claimed_job(row[-len(CLAIMED_COLUMNS) :]) for row in rows]
        rest = [job_id for job_id in job_ids if job_id not in {job.id for job in claimed}]
        left: list[Requeue] = []
        if rest:
            overdue, chosen, left = _isolate(conn, rest)
            expired = expire_overdue(conn, overdue) if overdue else []
            if expired:
                event_log.record(conn, expired)
            if chosen:
                more = event_log.record_change(
                    conn, _take(token, worker_id, lease_s, chosen), *CLAIMED_COLUMNS
                )
                claimed += [claimed_job(row[-len(CLAIMED_COLUMNS) :]) for row in more]
    return token, claimed, left


def _take(
    token: uuid.UUID,
    worker_id: str,
    lease_s: float,
    ids: list[uuid.UUID],
    *where: ColumnElement[bool],
) -> Update:
    """The UPDATE that makes the pending ones among ``ids`` (and ``where``) processing
    under ``token``."""
    now = func.now()
    return (
        update(Job)
        .where(Job.id.in_(ids), Job.state == JobState.pending, *where)
        .values(
            state=JobState.processing,
            attempts=Job.attempts + 1,
            lease_token=token,
            lease_until=now + timedelta(seconds=lease_s),
            worker_id=worker_id,
            started_at=now,
            queue_wait_ms=extract("epoch", now - Job.created_at) * 1000.0,
        )
    )


def _fresh(ids: list[uuid.UUID]) -> ColumnElement[bool]:
    """Those ``_isolate`` would take together when no job among ``ids`` was tried before:
    never tried, due, within their deadline. With one tried before among them the fast
    claim takes none, and ``_isolate`` decides (such a job may have to run alone)."""
    tried = aliased(Job)
    now = func.now()
    return and_(
        Job.attempts == 0,
        or_(Job.not_before.is_(None), Job.not_before <= now),
        or_(Job.deadline_at.is_(None), Job.deadline_at >= now),
        ~exists().where(tried.id.in_(ids), tried.state == JobState.pending, tried.attempts > 0),
    )


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
