"""The sweeper's writes in Postgres: leases of lost workers taken back, and deadlines
that passed while their jobs waited. Safe in many processes at once (rows are taken with
SKIP LOCKED); each worker's recovery thread (worker.recovery) runs it, and then
common.lost_ids for ids Redis lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select, update

from hepato.common import event_log
from hepato.common.constants import JobState
from hepato.common.jobs import Requeue, expire_overdue, pending_values
from hepato.common.tables import Job


@dataclass(frozen=True)
class Swept:
    requeue: list[Requeue]  # to push again, after the commit
    reclaimed: int  # leases that ran out (their worker was lost), back to pending
    failed: int  # leases that ran out on a job's last attempt
    expired: int  # pending jobs whose deadline passed while they waited


def sweep(engine: Engine, limit: int = 1000, expire_limit: int = 5000) -> Swept:
    """Recover from lost workers and end the jobs whose deadline passed before they ran.
    Safe to run in many processes at once: rows are taken with SKIP LOCKED, so each is
    handled by one sweeper.

    Returns the jobs to push again and what was reclaimed, failed and expired."""
    now = func.now()
    with event_log.transaction(engine) as conn:
        # A deadline fires while its job waits (behind a backlog, or for a model no
        # worker serves), not only when a worker claims it; its event, and its webhook,
        # are written in this transaction.
        expired = expire_overdue(
            conn, _take(Job.state == JobState.pending, Job.deadline_at < now, limit=expire_limit)
        )
        leased_out = _take(Job.state == JobState.processing, Job.lease_until < now, limit=limit)
        # A lease that ran out with attempts left: back to the queue.
        requeued = conn.execute(
            update(Job)
            .where(Job.id.in_(leased_out), Job.attempts < Job.max_attempts)
            .values(**pending_values(), error="lease expired: worker lost")
            .returning(Job.id, Job.model, Job.priority, Job.tenant)
        ).all()
        failed = (
            conn.execute(
                update(Job)
                .where(Job.id.in_(leased_out), Job.attempts >= Job.max_attempts)
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
        event_log.record(conn, [*(row[0] for row in requeued), *failed, *expired])
    return Swept([Requeue(*row) for row in requeued], len(requeued), len(failed), len(expired))


def _take(*where: Any, limit: int) -> Any:
    """Up to ``limit`` ids of the rows matching ``where``, locked; rows another sweeper
    holds are skipped, so many sweepers never handle one row twice."""
    return (
        select(Job.id).where(*where).limit(limit).with_for_update(skip_locked=True)
    ).scalar_subquery()
