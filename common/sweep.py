"""The sweeper's writes: leases of lost workers taken back, ids that Redis lost found
again. Safe in many processes at once (rows are taken with SKIP LOCKED); each worker's
recovery thread (worker.recovery) runs it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, func, select, update

from hepato.common import event_log
from hepato.common.constants import JobState
from hepato.common.jobs import Requeue, pending_values
from hepato.common.tables import Job


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
            .values(**pending_values(), error="lease expired: worker lost")
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
