"""Counts of jobs per state: what a batch's state, and whether it has finished, are read from."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import Session

from hepato.common.constants import TERMINAL_STATES, JobState
from hepato.common.tables import Job


def state_counts(
    conn: Connection | Session,
    *,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
) -> dict[str, int]:
    """How many jobs of one job or one batch are in each state; every state is a key."""
    scope = Job.id == job_id if job_id is not None else Job.batch_id == batch_id
    counts = {s.value: 0 for s in JobState}
    for state, n in conn.execute(select(Job.state, func.count()).where(scope).group_by(Job.state)):
        counts[state] = n
    return counts


def all_finished(counts: dict[str, int]) -> bool:
    return not any(n for state, n in counts.items() if state not in TERMINAL_STATES)


def count_unfinished(engine: Engine, models: Sequence[str]) -> int:
    """Jobs of ``models`` still pending or running: a burst worker stops at zero."""
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


def count_failed_by(engine: Engine, token: uuid.UUID, ids: Sequence[uuid.UUID]) -> int:
    """Of ``ids``, the jobs that the lease ``token`` left failed: what a worker's write of
    failures really did (the fence refuses it for jobs taken back from the worker)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(Job)
                .where(Job.id.in_(ids), Job.state == JobState.failed, Job.lease_token == token)
            ).scalar_one()
        )
