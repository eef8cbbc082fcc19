"""The job lifecycle in Postgres: creation, the fenced writes after a claim, cancel.

    create (pending) → claim (processing, under a lease token; common.claim)
    → complete (done) | fail (pending again, or failed) ; cancel (pending → canceled)

Every write after the claim is fenced: it touches only rows still carrying the lease
token of the claim (``_owned``), so a worker presumed dead cannot overwrite the winner.
Leases that run out are taken back by common.sweep."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, insert, select, update

from hepato.common import event_log, job_statements
from hepato.common.constants import PUBLIC_TENANT, JobState, Priority
from hepato.common.db import rows_params
from hepato.common.ids import new_job_id
from hepato.common.images import ImageInfo
from hepato.common.manifest import ModelManifest
from hepato.common.results import TaskResult
from hepato.common.room import Room, hold_room, refusal
from hepato.common.room import params as room_params
from hepato.common.tables import AuditEvent, Batch, Job


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
    # 'image', or a whole slide's 'plan' or 'tile' (batch_id is then the slide's id).
    kind: str = "image"
    batch_id: uuid.UUID | None = None
    # A tile's level-0 rectangle (x, y, w, h) and core (x0, y0, x1, y1).
    tile: tuple[int, int, int, int] | None = None
    core: tuple[int, int, int, int] | None = None
    # Its own webhook is due when it ends (a lone job with a callback_url).
    has_callback: bool = False


def claimed_job(row: Sequence[Any]) -> ClaimedJob:
    tile, core = tuple(row[9:13]), tuple(row[13:17])
    return ClaimedJob(
        id=row[0],
        object_key=row[1],
        attempts=row[2],
        max_attempts=row[3],
        question=row[4],
        created_at=row[5],
        queue_wait_ms=row[6],
        kind=row[7],
        batch_id=row[8],
        tile=tile if tile[0] is not None else None,
        core=core if core[0] is not None else None,
        has_callback=bool(row[17]),
    )


@dataclass(frozen=True)
class Requeue:
    """A job id to push to Redis again, after the transaction that made it pending."""

    id: uuid.UUID
    model: str
    priority: str
    tenant: str = PUBLIC_TENANT
    # A retry's backoff: wait this long before the id goes back on its queue, s.
    delay_s: float = 0.0


@dataclass(frozen=True)
class Backoff:
    """How long a failed attempt waits before its retry: ``first_s`` doubled per attempt
    made, at most ``max_s``, and jittered to 50-100% so that the jobs one outage failed
    together do not all come back at the same instant."""

    first_s: float = 0.0
    max_s: float = 60.0

    def delay_s(self, attempts: int) -> float:
        full = min(self.max_s, self.first_s * 2 ** max(attempts - 1, 0))
        return full * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class JobResult:
    id: uuid.UUID
    result: TaskResult
    batch_size: int
    inference_ms: float
    # Wall-clock times (timezone-aware) of the image's download and the model call's end.
    fetched_at: datetime | None = None
    inferred_at: datetime | None = None
    # A slide tile's per-class statistics (common.slide_finish sums them).
    tile_stats: dict[str, Any] | None = None
    # The worker's steps of its microbatch, ms (common.stages).
    stages: dict[str, float] | None = None


# --- create ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NewJob:
    """One accepted image, already in the object store."""

    filename: str
    object_key: str
    image: ImageInfo


@dataclass(frozen=True)
class Created:
    batch_id: uuid.UUID | None
    job_ids: list[uuid.UUID]  # in the order of the jobs given
    # The model's pending jobs before these, as the room check counted them (None: not
    # counted).
    queued_before: int | None = None


def create(
    engine: Engine,
    new: Sequence[NewJob],
    *,
    as_batch: bool,
    tenant: str,
    model: ModelManifest,
    priority: Priority,
    max_attempts: int,
    deadline_s: float | None,
    question: str | None,
    callback_url: str | None,
    room: Room | None = None,
    stages: dict[str, float] | None = None,
    job_ids: Sequence[uuid.UUID] | None = None,
    audit_row: Callable[[uuid.UUID | None, list[uuid.UUID]], dict[str, Any]] | None = None,
    before_commit: Callable[[], object] | None = None,
) -> Created:
    """Commit ``new`` as pending jobs (and, ``as_batch``, their batch) in one transaction
    of one statement per table; the caller pushes their ids only after this returns.
    With ``room``, the model's and the tenant's bounds are held (common.room): past them,
    QueueFull and nothing is inserted. ``stages``: the gateway's steps (common.stages).
    ``job_ids``: the new jobs' ids, one per entry of ``new`` (default: fresh ones).
    ``audit_row``: the submission's audit_events row (common.audit.row) from the batch id
    and job ids, inserted in this transaction: it commits with the jobs or not at all.
    ``before_commit``: called last in the transaction; what it raises rolls it back."""
    batch_id = uuid.uuid4() if as_batch else None
    deadline_at = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s else None
    job_ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in new]
    if len(job_ids) != len(new):
        raise ValueError(f"{len(job_ids)} ids for {len(new)} jobs")
    per_file: dict[str, list[Any]] = {
        "id": job_ids,
        "filename": [j.filename for j in new],
        "object_key": [j.object_key for j in new],
        "image_format": [j.image.format for j in new],
        "size_bytes": [j.image.size for j in new],
        "width": [j.image.width for j in new],
        "height": [j.image.height for j in new],
    }
    same = {
        "batch_id": batch_id,
        "tenant": tenant,
        "model": model.name,
        "task": model.task,
        "priority": priority.value,
        "state": JobState.pending.value,
        "attempts": 0,
        "max_attempts": max_attempts,
        "deadline_at": deadline_at,
        "question": question,
        # A batch's jobs are reported together, by the batch's webhook.
        "callback_url": None if batch_id else callback_url,
        "stages": stages or {},
    }
    if batch_id is None and room is not None and audit_row is not None:
        return _create_held(
            engine, per_file, same, room, job_ids, model.name, tenant, audit_row, before_commit
        )
    queued_before = None
    with event_log.transaction(engine) as conn:
        if room is not None:
            queued_before = hold_room(conn, model.name, tenant, len(job_ids), room)
        if batch_id is not None:
            conn.execute(
                insert(Batch).values(
                    id=batch_id,
                    tenant=tenant,
                    model=model.name,
                    priority=priority.value,
                    total=len(job_ids),
                    callback_url=callback_url,
                )
            )
        if audit_row is not None:
            conn.execute(insert(AuditEvent), audit_row(batch_id, job_ids))
        # The rows and their first events in one statement.
        event_log.record_logged(
            conn,
            job_statements.inserting(tuple(per_file), tuple(same)),
            rows_params(per_file, same),
        )
        if before_commit is not None:
            before_commit()
    return Created(batch_id, job_ids, queued_before)


def _create_held(
    engine: Engine,
    per_file: dict[str, list[Any]],
    same: dict[str, Any],
    room: Room,
    job_ids: list[uuid.UUID],
    model: str,
    tenant: str,
    audit_row: Callable[[uuid.UUID | None, list[uuid.UUID]], dict[str, Any]],
    before_commit: Callable[[], object] | None,
) -> Created:
    """``create`` of jobs without a batch (the real-time path) as one statement: the room
    held, the rows, their events and the audit row. It commits by itself, or, with
    ``before_commit``, in a transaction that waits for it."""
    params = {
        **rows_params(per_file, same),
        **room_params(model, tenant, len(job_ids), room),
        **{f"a_{name}": value for name, value in audit_row(None, job_ids).items()},
    }
    statement = job_statements.inserting_held(tuple(per_file), tuple(same))
    with (
        refusal(model, tenant, len(job_ids), room),
        event_log.transaction(engine, autocommit=before_commit is None) as conn,
    ):
        rows = event_log.record_logged(conn, statement, params)
        if before_commit is not None:
            before_commit()
    return Created(None, job_ids, int(rows[0].queued_before))


# --- the fence -----------------------------------------------------------------------
def _owned(token: uuid.UUID, ids: Sequence[uuid.UUID]):
    # The fence: rows this claim still holds. Every write after the claim goes through it.
    return and_(Job.id.in_(ids), Job.lease_token == token, Job.state == JobState.processing)


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
    engine: Engine,
    token: uuid.UUID,
    results: Sequence[JobResult],
    model_version: str,
    *,
    alone: bool = False,
) -> set[uuid.UUID]:
    """Write results and ``done`` in one transaction, for the jobs this lease still
    owns. Returns the ids written; the others were taken over by another worker.
    ``alone``: the end of no job of ``results`` does anything beyond its rows and events
    (``ends_alone``): the one statement commits by itself, without the BEGIN, the
    webhooks' read and the COMMIT round trips."""
    if not results:
        return set()
    values: dict[str, list[Any]] = {
        "id": [r.id for r in results],
        "batch_size": [r.batch_size for r in results],
        "inference_ms": [r.inference_ms for r in results],
        "result": [r.result.model_dump(mode="json") for r in results],
        "fetched_at": [r.fetched_at for r in results],
        "inferred_at": [r.inferred_at for r in results],
        "tile_stats": [r.tile_stats for r in results],
        "stages": [r.stages or {} for r in results],
    }
    with event_log.transaction(engine, autocommit=alone) as conn:
        # One statement for the whole microbatch, its events included, fenced row by row
        # as ``_owned`` (lease token and state); each lone job's answer its last column.
        written = event_log.record_logged(
            conn,
            job_statements.completing(),
            {**rows_params(values), "token": token, "model_version": model_version},
            follow_up=not alone,
        )
        event_log.answer(conn, {row.id: row[-1] for row in written})
    return {row.id for row in written}


def ends_alone(claimed: Sequence[ClaimedJob]) -> bool:
    """Whether the end of every job of ``claimed`` touches nothing but its own row and
    events: no webhook of its own, and no batch, or one whose end this process already
    knows to do nothing (common.event_log: no batch webhook, not a slide)."""
    return all(
        not j.has_callback if j.batch_id is None else event_log.finishes_nothing(j.batch_id)
        for j in claimed
    )


def fail(
    engine: Engine,
    token: uuid.UUID,
    errors: dict[uuid.UUID, str],
    *,
    retry: bool,
    backoff: Backoff = Backoff(),
) -> list[Requeue]:
    """End owned jobs with an error. With ``retry``, jobs with attempts left go back to
    ``pending``, not to be claimed before their backoff has passed (returned, for the
    caller to push after commit); the rest are ``failed``."""
    if not errors:
        return []
    requeue: list[Requeue] = []
    with event_log.transaction(engine) as conn:
        owned = conn.execute(
            select(Job.id, Job.attempts, Job.max_attempts, Job.model, Job.priority, Job.tenant)
            .where(_owned(token, list(errors)))
            .with_for_update()
        ).all()
        for job_id, attempts, max_attempts, model, priority, tenant in owned:
            if retry and attempts < max_attempts:
                wait_s = backoff.delay_s(attempts)
                values = pending_values()
                values["error"] = errors[job_id]
                values["not_before"] = func.now() + timedelta(seconds=wait_s)
                requeue.append(Requeue(job_id, model, priority, tenant, wait_s))
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


def expire_overdue(conn: Connection, among: Any) -> list[uuid.UUID]:
    """End the pending jobs among ``among`` (ids, or a subquery of them) whose deadline
    has passed, as ``expired``; the ids, for the caller's event_log.record. The claim does
    it for what it popped, the sweeper for what waits."""
    now = func.now()
    return list(
        conn.execute(
            update(Job)
            .where(Job.id.in_(among), Job.state == JobState.pending, Job.deadline_at < now)
            .values(state=JobState.expired, finished_at=now, error="deadline passed before it ran")
            .returning(Job.id)
        ).scalars()
    )


def pending_values() -> dict[str, object]:
    """A job back in the queue: no lease, no worker, re-enqueued now."""
    return {
        "state": JobState.pending,
        "lease_token": None,
        "lease_until": None,
        "worker_id": None,
        "enqueued_at": func.now(),
    }


# --- cancel ---------------------------------------------------------------------------
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
