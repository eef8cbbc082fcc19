"""The job lifecycle's hot statements (create, claim, complete), each built once and run
with bound parameters. Building one of these SQLAlchemy expressions took longer than
Postgres takes to run it (a claim: about 5 ms of Python for 0.5 ms of SQL on the bench
VM), and a statement object used again is also compiled only once."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    BigInteger,
    Interval,
    Select,
    String,
    Text,
    Uuid,
    any_,
    bindparam,
    case,
    cast,
    exists,
    extract,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import aliased

from hepato.common import event_log
from hepato.common.constants import JobState
from hepato.common.db import rows_insert, unnest_rows
from hepato.common.tables import AuditEvent, Job

# What a claim reads back of each job it took, in ClaimedJob's order (jobs.claimed_job).
CLAIMED_COLUMNS = (
    Job.id,
    Job.object_key,
    Job.attempts,
    Job.max_attempts,
    Job.question,
    Job.created_at,
    Job.queue_wait_ms,
    Job.kind,
    Job.batch_id,
    Job.tile_x,
    Job.tile_y,
    Job.tile_w,
    Job.tile_h,
    Job.core_x0,
    Job.core_y0,
    Job.core_x1,
    Job.core_y1,
    Job.callback_url.is_not(None),
)

# What a complete writes per job (``rows_params`` of these, and :token, :model_version).
COMPLETED_COLUMNS = (
    "id",
    "batch_size",
    "inference_ms",
    "result",
    "fetched_at",
    "inferred_at",
    "tile_stats",
    "stages",
)


@functools.cache
def inserting(per_row: tuple[str, ...], same: tuple[str, ...]) -> Select[Any]:
    """New jobs with their first events (``rows_params`` of the columns named), one
    statement per set of columns."""
    return event_log.logged(rows_insert(Job, {key: [] for key in per_row}, dict.fromkeys(same)))


@functools.cache
def inserting_held(per_row: tuple[str, ...], same: tuple[str, ...]) -> Select[Any]:
    """``inserting``, with the queue's room held first and the submission's audit row
    (``:a_<column>``), in one statement: the submission of one image, with no BEGIN and
    COMMIT round trips when nothing else goes in its transaction. The room is held by
    ``hepato_hold_room`` (common.room's ``HOLD`` parameters), in a materialized CTE that
    the new rows are joined to, so it has run, and taken the model's lock, before the
    first row is inserted; it raises when the queue is full, failing the whole statement.
    Returns the room's count (the model's pending jobs before these) last."""
    room = (
        select(
            func.hepato_hold_room(
                bindparam("room_model", type_=String()),
                bindparam("room_tenant", type_=String()),
                bindparam("room_adding", type_=BigInteger()),
                bindparam("room_per_model", type_=BigInteger()),
                bindparam("room_per_tenant", type_=BigInteger()),
            ).label("queued_before")
        )
        .cte("room")
        .prefix_with("MATERIALIZED")
    )
    # As text: a second INSERT built by SQLAlchemy would take over the first's column
    # defaults (jobs.kind's went missing).
    audit = AuditEvent.__table__.c
    audited = (
        text(
            f"INSERT INTO audit_events ({', '.join(AUDITED)}) "
            f"VALUES ({', '.join(f':a_{name}' for name in AUDITED)}) RETURNING id"
        )
        .bindparams(*(bindparam(f"a_{name}", type_=audit[name].type) for name in AUDITED))
        .columns(audit.id)
        .cte("audited")
    )
    rows = rows_insert(Job, {key: [] for key in per_row}, dict.fromkeys(same), joined=room)
    logged = event_log.logged(rows)
    queued_before = select(room.c.queued_before).scalar_subquery().label("queued_before")
    return logged.add_cte(audited).add_columns(queued_before)


# The audit row's columns that a submission names (common.audit.row's keys).
AUDITED = ("tenant", "key_id", "client", "action", "object_type", "object_id", "detail")


@functools.cache
def claiming(*, fresh: bool) -> Select[Any]:
    """The claim of the pending jobs among ``:ids`` under ``:token`` for ``:lease``, with
    its events; returns CLAIMED_COLUMNS last. ``fresh``: only those common.claim's
    ``_isolate`` would take together when no job among them was tried before (never
    tried, due, within their deadline); with one tried before among them it takes none,
    and ``_isolate`` decides (such a job may have to run alone)."""
    ids = bindparam("ids", type_=ARRAY(Uuid()))
    now = func.now()
    where = [Job.id == any_(ids), Job.state == JobState.pending]
    if fresh:
        tried = aliased(Job)
        where += [
            Job.attempts == 0,
            or_(Job.not_before.is_(None), Job.not_before <= now),
            or_(Job.deadline_at.is_(None), Job.deadline_at >= now),
            ~exists().where(
                tried.id == any_(ids), tried.state == JobState.pending, tried.attempts > 0
            ),
        ]
    change = (
        update(Job)
        .where(*where)
        .values(
            state=JobState.processing,
            attempts=Job.attempts + 1,
            lease_token=bindparam("token", type_=Uuid()),
            lease_until=now + bindparam("lease", type_=Interval()),
            worker_id=bindparam("worker_id", type_=String()),
            started_at=now,
            queue_wait_ms=extract("epoch", now - Job.created_at) * 1000.0,
        )
    )
    return event_log.logged(change, *CLAIMED_COLUMNS)


# What a finished lone job's caller is answered with (gateway.finish_watch), as the
# completing statement left the row: sent with the job's "finished" wake-up, so that a
# waiting /v1/predict needs no read of its own.
ANSWER_COLUMNS = (
    Job.id,
    Job.state,
    Job.error,
    Job.model,
    Job.model_version,
    Job.task,
    Job.width,
    Job.height,
    Job.result,
    Job.queue_wait_ms,
    Job.inference_ms,
    Job.batch_size,
    Job.stages,
    Job.inferred_at,
    Job.finished_at,
)


@functools.cache
def completing() -> Select[Any]:
    """Results and ``done`` for a microbatch, with its events, fenced row by row: a job
    whose lease ``:token`` no longer holds is neither written nor logged. Returns, last,
    each lone job's answer (``ANSWER_COLUMNS`` as JSON text; NULL for a batch's job,
    which no caller waits on)."""
    rows = unnest_rows(
        Job,
        {key: [] for key in COMPLETED_COLUMNS},
        # A job without statistics (not a tile) has none: SQL NULL, not JSON null.
        types={"tile_stats": JSONB(none_as_null=True)},
    )
    change = (
        update(Job)
        .where(
            Job.id == rows.c.id,
            Job.lease_token == bindparam("token", type_=Uuid()),
            Job.state == JobState.processing,
        )
        .values(
            state=JobState.done,
            finished_at=func.now(),
            lease_until=None,
            batch_size=rows.c.batch_size,
            inference_ms=rows.c.inference_ms,
            error=None,
            model_version=bindparam("model_version", type_=String()),
            result=rows.c.result,
            fetched_at=rows.c.fetched_at,
            inferred_at=rows.c.inferred_at,
            tile_stats=rows.c.tile_stats,
            # The gateway's steps stay; this run's replace an earlier run's.
            stages=func.coalesce(Job.stages, cast({}, JSONB)).op("||")(rows.c.stages),
        )
    )
    # Keys as SQL literals: json_build_object cannot type a bound parameter's "any".
    pairs: list[Any] = []
    for column in ANSWER_COLUMNS:
        pairs += [literal_column(f"'{column.key}'"), column]
    answer = case((Job.batch_id.is_(None), cast(func.json_build_object(*pairs), Text)), else_=None)
    return event_log.logged(change, answer)
