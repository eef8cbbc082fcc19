"""Live status as Server-Sent Events, of a batch's jobs or of one job.

``GET /v1/batches/{id}/events`` and ``GET /v1/jobs/{id}/events``. Every event comes from
the ``job_events`` table (common.event_log), never from Redis: a Redis wake-up
(gateway.wakeups) only makes the stream re-read the table sooner. Without one the stream
re-reads every ``events_poll_interval_s``, so a lost wake-up (Redis restarted, flushed,
another gateway replica's subscriber) costs latency, never an event, and no client makes
Postgres read faster than that while nothing happens. An event committed behind an older
transaction still running is not readable yet (common.event_log): a stream that finds
one held back looks again soon, and never ends on counts that include it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header
from fastapi.exceptions import RequestValidationError
from sqlalchemy import Engine
from sse_starlette import EventSourceResponse, ServerSentEvent

from hepato.common import audit, event_log, schemas
from hepato.common.audit import Action, ObjectType
from hepato.common.constants import batch_events_channel, batch_state, job_events_channel
from hepato.common.job_counts import all_finished, state_counts
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import Resources, ResourcesDep
from hepato.gateway.lookups import batch_or_404, job_or_404
from hepato.gateway.wakeups import WakeupHub, get_hub

router = APIRouter(prefix="/v1", tags=["events"])

HubDep = Annotated[WakeupHub, Depends(get_hub)]

# Events read per query; a longer backlog is sent page by page.
PAGE = 500
# A burst of wake-ups (one per worker commit) is folded into one read per this many s.
COALESCE_S = 0.05
# Events committed but held back behind an older running transaction (common.event_log)
# had their wake-up already: the stream looks again after this long, doubled while they
# stay held (a long transaction), up to the usual interval.
HELD_RETRY_S = 0.05


def _last_event_id(
    value: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="Resume: only the events after this id (what an EventSource sends "
            "when it reconnects). Ids are opaque; a bare integer, an id from before they "
            "named a transaction, is still accepted.",
        ),
    ] = None,
) -> event_log.Cursor | None:
    if value is None:
        return None
    try:
        return event_log.parse_cursor(value)
    except ValueError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", "Last-Event-ID"),
                    "msg": "not an event id of this service",
                    "input": value,
                }
            ]
        ) from exc


LastEventId = Annotated[event_log.Cursor | None, Depends(_last_event_id)]


def resume_point(cursor: event_log.Cursor | None) -> int | None:
    """What the audit trail keeps of a resume cursor: the event's id (the row's key)."""
    return cursor[1] if cursor is not None else None


STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "`event: job` per state change (id: an opaque resume point, "
        "for Last-Event-ID); the batch stream ends with `event: batch`, the job stream "
        "after the job's terminal event",
    },
    404: {"model": schemas.ErrorOut},
}


@dataclass(frozen=True)
class Scope:
    """What one stream follows: one job, or every job of one batch."""

    job_id: uuid.UUID | None = None
    batch_id: uuid.UUID | None = None

    @property
    def channel(self) -> str:
        if self.batch_id is not None:
            return batch_events_channel(str(self.batch_id))
        return job_events_channel(str(self.job_id))


@dataclass(frozen=True)
class Page:
    events: list[event_log.Event]
    # Counts per job state from the same snapshot as ``events``; None when not read.
    counts: dict[str, int] | None
    # Events committed but not yet readable (common.event_log.Read.held).
    held: bool = False


def _read(engine: Engine, scope: Scope, after: event_log.Cursor, with_counts: bool) -> Page:
    # One snapshot for the events and the states: each state change commits with its
    # event, so "every job terminal" here, with none held back, means every terminal
    # event is in ``found``.
    with (
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
        conn.begin(),
    ):
        got = event_log.read(conn, after, job_id=scope.job_id, batch_id=scope.batch_id, limit=PAGE)
        found = got.events
        if len(found) == PAGE or got.held or not (found or with_counts):
            return Page(found, None, got.held)
        counts = state_counts(conn, job_id=scope.job_id, batch_id=scope.batch_id)
    return Page(found, counts)


async def _stream(
    res: Resources, hub: WakeupHub, scope: Scope, after: event_log.Cursor
) -> AsyncIterator[ServerSentEvent]:
    # A batch's jobs change in bursts: one re-read per burst, not one per job.
    coalesce_s = COALESCE_S if scope.batch_id is not None else 0.0
    first = True
    held_wait = HELD_RETRY_S
    # Subscribed before the first read: a change committed between that read and the
    # first wait still wakes the stream.
    async with hub.wakeup(scope.channel, coalesce_s) as wake:
        while True:
            page = await anyio.to_thread.run_sync(_read, res.engine, scope, after, first)
            first = False
            for event in page.events:
                data = event.data()
                data["error"] = schemas.public_error(event.error)
                yield ServerSentEvent(
                    json.dumps(data), event="job", id=event_log.format_cursor(event.cursor)
                )
                after = event.cursor
            counts = page.counts
            if counts is not None and all_finished(counts):
                if scope.batch_id is not None:
                    data = {
                        "batch_id": str(scope.batch_id),
                        "state": batch_state(counts).value,
                        "counts": counts,
                    }
                    # No id: the last job event's id stays the resume point, so a client
                    # that reconnects after it gets this closing event again.
                    yield ServerSentEvent(json.dumps(data), event="batch")
                return
            if counts is None and page.events:
                continue  # a full page, or some held back: more are waiting
            interval = res.settings.events_poll_interval_s
            if page.held:
                await wake.wait(min(held_wait, interval))
                held_wait *= 2
            else:
                held_wait = HELD_RETRY_S
                await wake.wait(interval)


def event_stream(res: Resources, events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """``events`` as a Server-Sent Events response, kept alive by pings."""
    return EventSourceResponse(
        events,
        ping=res.settings.events_keepalive_s,
        # Proxies such as nginx would otherwise buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _response(
    res: Resources, hub: WakeupHub, scope: Scope, last_event_id: event_log.Cursor | None
) -> EventSourceResponse:
    return event_stream(res, _stream(res, hub, scope, last_event_id or event_log.START))


# Plain sessions, not SessionDep: a yield dependency would hold its connection for as long
# as the stream stays open.
@router.get(
    "/batches/{batch_id}/events",
    response_class=EventSourceResponse,
    responses=STREAM_RESPONSES,
    summary="Live state changes of a batch's jobs (Server-Sent Events)",
)
def batch_events(
    batch_id: str,
    res: ResourcesDep,
    hub: HubDep,
    caller: CallerDep,
    last_event_id: LastEventId,
) -> EventSourceResponse:
    with res.sessions() as session:
        batch = batch_or_404(session, batch_id, caller.tenant)
        audit.commit(
            session,
            caller,
            Action.watch,
            ObjectType.batch,
            batch.id,
            resume_after=resume_point(last_event_id),
        )
    return _response(res, hub, Scope(batch_id=batch.id), last_event_id)


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses=STREAM_RESPONSES,
    summary="Live state changes of a job (Server-Sent Events)",
)
def job_events(
    job_id: str,
    res: ResourcesDep,
    hub: HubDep,
    caller: CallerDep,
    last_event_id: LastEventId,
) -> EventSourceResponse:
    with res.sessions() as session:
        job = job_or_404(session, job_id, caller.tenant)
        audit.commit(
            session,
            caller,
            Action.watch,
            ObjectType.job,
            job.id,
            resume_after=resume_point(last_event_id),
        )
    return _response(res, hub, Scope(job_id=job.id), last_event_id)
