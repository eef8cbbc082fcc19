"""Job state transitions in Postgres. Every write a worker makes after its claim is
fenced by the lease token, so a worker presumed dead cannot overwrite the winner."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, bindparam, extract, func, select, update
from sqlalchemy.dialects.postgresql import JSONB

from hepato.common import event_log
from hepato.common.constants import JobState
from hepato.common.results import TaskResult
from hepato.common.tables import Job


@dataclass(frozen=True)
class ClaimedJob:
    id: uuid.UUID
    object_key: str
    attempts: int
    max_attempts: int
    question: str | None
    # When the job was accepted (the database's clock): the start of its end-to-end time.
    created_at: datetime | None = None
    queue_wait_ms: float | None = None


@dataclass(frozen=True)
class Requeue:
    """A job id to push to Redis again, after the transaction that made it pending."""

    id: uuid.UUID
    model: str
    priority: str


@dataclass(frozen=True)
class JobResult:
    id: uuid.UUID
    result: TaskResult
    batch_size: int
    inference_ms: float
    # Wall-clock times (timezone-aware) of the image's download and the model call's end.
    fetched_at: datetime | None = None
    inferred_at: datetime | None = None


def _uuids(ids: Iterable[str | uuid.UUID]) -> list[uuid.UUID]:
    out = []
    for raw in ids:
        try:
            out.append(raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw)))
        except ValueError:
            continue  # garbage on the queue is dropped, never claimed
    return out


def claim(
    engine: Engine, ids: Iterable[str | uuid.UUID], worker_id: str, lease_s: float
) -> tuple[uuid.UUID, list[ClaimedJob]]:
    """Claim the still-pending jobs among ``ids`` under one fresh lease token. Ids that
    are no longer pending (duplicates, canceled, done) are dropped; jobs whose deadline
    has passed become ``expired`` instead of running."""
    job_ids = _uuids(ids)
    token = uuid.uuid4()
    if not job_ids:
        return token, []
    now = func.now()
    with event_log.transaction(engine) as conn:
        expired = (
            conn.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.state == JobState.pending, Job.deadline_at < now)
                .values(
                    state=JobState.expired, finished_at=now, error="deadline passed before it ran"
                )
                .returning(Job.id)
            )
            .scalars()
            .all()
        )
        rows = conn.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.state == JobState.pending)
            .values(
                state=JobState.processing,
                attempts=Job.attempts + 1,
                lease_token=token,
                lease_until=now + timedelta(seconds=lease_s),
                worker_id=worker_id,
                started_at=now,
                queue_wait_ms=extract("epoch", now - Job.created_at) * 1000.0,
            )
            .returning(
                Job.id,
                Job.object_key,
                Job.attempts,
                Job.max_attempts,
                Job.question,
                Job.created_at,
                Job.queue_wait_ms,
            )
        ).all()
        event_log.record(conn, [*expired, *(row[0] for row in rows)])
    return token, [ClaimedJob(*row) for row in rows]


def _owned(token: uuid.UUID, ids: Sequence[uuid.UUID]):
    return and_(Job.id.in_(ids), Job.lease_token == token, Job.state == JobState.processing)


def pending_among(engine: Engine, ids: Iterable[str | uuid.UUID]) -> list[Requeue]:
    """The still-pending jobs among ``ids``, to push back on their own queues."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.model, Job.priority).where(
                Job.id.in_(_uuids(ids)), Job.state == JobState.pending
            )
        ).all()
    return [Requeue(*row) for row in rows]


def extend_leases(
    engine: Engine, token: uuid.UUID, ids: Sequence[uuid.UUID], lease_s: float
) -> int:
    with engine.begin() as conn:
        result = conn.execute(
            update(Job)
            .where(_owned(token, ids))
            .values(lease_until=func.now() + timedelta(seconds=lease_s))
        )
    return result.rowcount


def complete(
    engine: Engine, token: uuid.UUID, results: Sequence[JobResult], model_version: str
) -> set[uuid.UUID]:
    """Write results and ``done`` in one transaction, for the jobs this lease still
    owns. Returns the ids written; the others were taken over by another worker."""
    if not results:
        return set()
    with event_log.transaction(engine) as conn:
        # Row locks keep the owned set stable until commit: no one can reclaim in between.
        owned = set(
            conn.execute(
                select(Job.id).where(_owned(token, [r.id for r in results])).with_for_update()
            ).scalars()
        )
        mine = [r for r in results if r.id in owned]
        if not mine:
            return set()
        # One executemany (pipelined by psycopg), not a round trip per job.
        conn.execute(
            update(Job)
            .where(Job.id == bindparam("job"))
            .values(
                state=JobState.done,
                finished_at=func.now(),
                lease_until=None,
                batch_size=bindparam("size"),
                inference_ms=bindparam("ms"),
                error=None,
                model_version=bindparam("version"),
                result=bindparam("result", type_=JSONB),
                fetched_at=bindparam("fetched"),
                inferred_at=bindparam("inferred"),
            ),
            [
                {
                    "job": r.id,
                    "size": r.batch_size,
                    "ms": r.inference_ms,
                    "version": model_version,
                    "fetched": r.fetched_at,
                    "inferred": r.inferred_at,
                    "result": r.result.model_dump(mode="json"),
                }
                for r in mine
            ],
        )
        event_log.record(conn, [r.id for r in mine])
    return owned


def fail(
    engine: Engine, token: uuid.UUID, errors: dict[uuid.UUID, str], *, retry: bool
) -> list[Requeue]:
    """End owned jobs with an error. With ``retry``, jobs with attempts left go back to
    ``pending`` (returned, for the caller to push after commit); the rest are ``failed``."""
    if not errors:
        return []
    requeue: list[Requeue] = []
    with event_log.transaction(engine) as conn:
        owned = conn.execute(
            select(Job.id, Job.attempts, Job.max_attempts, Job.model, Job.priority)
            .where(_owned(token, list(errors)))
            .with_for_update()
        ).all()
        for job_id, attempts, max_attempts, model, priority in owned:
            if retry and attempts < max_attempts:
                values = _pending_values()
                values["error"] = errors[job_id]
                requeue.append(Requeue(job_id, model, priority))
            else:
                values = {
                    "state": JobState.failed,
                    "finished_at": func.now(),
                    "lease_until": None,
                    "error": errors[job_id]
                    if not retry
                    else f"{errors[job_id]} (gave up after {attempts} attempts)",
                }
            conn.execute(update(Job).where(Job.id == job_id).values(**values))
        event_log.record(conn, [row[0] for row in owned])
    return requeue


def _pending_values() -> dict[str, object]:
    return {
        "state": JobState.pending,
        "lease_token": None,
        "lease_until": None,
        "worker_id": None,
        "enqueued_at": func.now(),
    }


@dataclass(frozen=True)
class Swept:
    requeue: list[Requeue]  # to push again, after the commit
    reclaimed: int  # leases that ran out (their worker was lost), back to pending
    failed: int  # leases that ran out on a job's last attempt


def sweep(engine: Engine, requeue_after_s: float, limit: int = 1000) -> Swept:
    """Recover from lost workers and a lost Redis. Safe to run in many processes at
    once: rows are taken with SKIP LOCKED, so each is handled by one sweeper.

    Returns the jobs to push again and what was reclaimed and failed."""
    now = func.now()
    with event_log.transaction(engine) as conn:
        expired = (
            select(Job.id)
            .where(Job.state == JobState.processing, Job.lease_until < now)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        # A lease that ran out with attempts left: back to the queue.
        requeued = conn.execute(
            update(Job)
            .where(Job.id.in_(expired), Job.attempts < Job.max_attempts)
            .values(**_pending_values(), error="lease expired: worker lost")
            .returning(Job.id, Job.model, Job.priority)
        ).all()
        failed = (
            conn.execute(
                update(Job)
                .where(Job.id.in_(expired), Job.attempts >= Job.max_attempts)
                .values(
                    state=JobState.failed,
                    finished_at=now,
                    lease_until=None,
                    error=func.concat("lease expired after ", Job.attempts, " attempts"),
                )
                .returning(Job.id)
            )
            .scalars()
            .all()
        )
        stale = (
            select(Job.id)
            .where(
                Job.state == JobState.pending,
                Job.enqueued_at < now - timedelta(seconds=requeue_after_s),
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        lost = conn.execute(
            update(Job)
            .where(Job.id.in_(stale))
            .values(enqueued_at=now)
            .returning(Job.id, Job.model, Job.priority)
        ).all()
        event_log.record(conn, [*(row[0] for row in requeued), *failed])
    return Swept([Requeue(*row) for row in (*requeued, *lost)], len(requeued), len(failed))


def cancel(
    engine: Engine, *, job_id: uuid.UUID | None = None, batch_id: uuid.UUID | None = None
) -> int:
    """Cancel what has not started: pending jobs become ``canceled``; a worker that pops
    their ids later drops them at claim. Returns how many were canceled."""
    where = Job.id == job_id if job_id is not None else Job.batch_id == batch_id
    with event_log.transaction(engine) as conn:
        canceled = (
            conn.execute(
                update(Job)
                .where(where, Job.state == JobState.pending)
                .values(state=JobState.canceled, finished_at=func.now(), error="canceled by client")
                .returning(Job.id)
            )
            .scalars()
            .all()
        )
        event_log.record(conn, canceled)
    return len(canceled)


def count_unfinished(engine: Engine, models: Sequence[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.model.in_(models), Job.state.in_([JobState.pending, JobState.processing])
                )
            ).scalar_one()
        )
