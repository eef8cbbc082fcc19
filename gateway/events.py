"""Live status as Server-Sent Events: ``GET /v1/batches/{id}/events`` and
``GET /v1/jobs/{id}/events``.

Every event comes from the ``job_events`` table (common.event_log), never from Redis: a
Redis wake-up only makes the stream re-read the table sooner. Without one the stream
re-reads every ``events_poll_interval_s``, so a lost wake-up (Redis restarted, flushed,
another gateway replica's subscriber) costs latency, never an event, and no client makes
Postgres read faster than that while nothing happens."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import anyio
import redis
import redis.asyncio
from fastapi import APIRouter, Header
from sqlalchemy import Engine, func, select
from sse_starlette import EventSourceResponse, ServerSentEvent

from hepato.common import event_log, schemas
from hepato.common.constants import (
    TERMINAL_STATES,
    JobState,
    batch_events_channel,
    batch_state,
    job_events_channel,
)
from hepato.common.tables import Job
from hepato.gateway.auth import TenantDep
from hepato.gateway.deps import Resources, ResourcesDep
from hepato.gateway.lookups import batch_or_404, job_or_404

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["events"])

# Events read per query; a longer backlog is sent page by page.
PAGE = 500
# A burst of wake-ups (one per worker commit) is folded into one read per this many s.
COALESCE_S = 0.05

LastEventId = Annotated[
    int | None,
    Header(
        alias="Last-Event-ID",
        ge=0,
        description="Resume: only the events after this id (what an EventSource sends "
        "when it reconnects)",
    ),
]

STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "`event: job` per state change (id strictly increasing); the batch "
        "stream ends with `event: batch`, the job stream after the job's terminal event",
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


def _read(engine: Engine, scope: Scope, after: int, with_counts: bool) -> Page:
    # One snapshot for the events and the states: each state change commits with its
    # event, so "every job terminal" here means every terminal event is in ``found``.
    with (
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
        conn.begin(),
    ):
        found = event_log.read(
            conn, after, job_id=scope.job_id, batch_id=scope.batch_id, limit=PAGE
        )
        if len(found) == PAGE or not (found or with_counts):
            return Page(found, None)
        where = (
            Job.id == scope.job_id if scope.job_id is not None else Job.batch_id == scope.batch_id
        )
        counts = {s.value: 0 for s in JobState}
        for state, n in conn.execute(
            select(Job.state, func.count()).where(where).group_by(Job.state)
        ):
            counts[state] = n
    return Page(found, counts)


class Wakeups:
    """A Redis subscription to one channel, used only as a hint to read again. Redis
    being down or dropping the subscription degrades to the interval re-read."""

    def __init__(self, url: str, channel: str, coalesce_s: float) -> None:
        self.client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2)
        self.channel = channel
        self.coalesce_s = coalesce_s
        self.pubsub: redis.asyncio.client.PubSub | None = None

    async def subscribe(self) -> redis.asyncio.client.PubSub | None:
        """Subscribe (once). Done before the stream's first read, so that a change
        committed between that read and the first wait still wakes it. None: Redis is
        unavailable."""
        try:
            if self.pubsub is None:
                self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await self.pubsub.subscribe(self.channel)
            return self.pubsub
        except (redis.RedisError, OSError):
            log.debug("event wake-ups unavailable; re-reading on the interval", exc_info=True)
            await self._drop()
            return None

    async def wait(self, timeout_s: float) -> None:
        """Return on a wake-up, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            pubsub = await self.subscribe()
            if pubsub is None:
                await anyio.sleep(timeout_s)
                return
            # get_message returns None early for the (ignored) subscribe confirmation.
            while (remaining := deadline - time.monotonic()) > 0:
                if await pubsub.get_message(timeout=remaining) is not None:
                    await anyio.sleep(self.coalesce_s)
                    while await pubsub.get_message(timeout=0) is not None:
                        pass
                    return
        except (redis.RedisError, OSError):
            log.debug("event wake-ups unavailable; re-reading on the interval", exc_info=True)
            await self._drop()
            await anyio.sleep(max(0.0, deadline - time.monotonic()))

    async def _drop(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()

    async def close(self) -> None:
        # Shielded: this runs when the client disconnects, i.e. inside a cancellation.
        with anyio.CancelScope(shield=True):
            await self._drop()
            with contextlib.suppress(redis.RedisError, OSError):
                await self.client.aclose()


async def _stream(res: Resources, scope: Scope, after: int) -> AsyncIterator[ServerSentEvent]:
    # A batch's jobs change in bursts: one re-read per burst, not one per job.
    coalesce_s = COALESCE_S if scope.batch_id is not None else 0.0
    wakeups = Wakeups(res.settings.redis_url, scope.channel, coalesce_s)
    first = True
    try:
        await wakeups.subscribe()
        while True:
            page = await anyio.to_thread.run_sync(_read, res.engine, scope, after, first)
            first = False
            for event in page.events:
                yield ServerSentEvent(json.dumps(event.data()), event="job", id=str(event.id))
                after = event.id
            counts = page.counts
            if counts is not None and not any(
                n for state, n in counts.items() if state not in TERMINAL_STATES
            ):
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
                continue  # a full page: more are waiting
            await wakeups.wait(res.settings.events_poll_interval_s)
    finally:
        await wakeups.close()


def _response(res: Resources, scope: Scope, last_event_id: int | None) -> EventSourceResponse:
    return EventSourceResponse(
        _stream(res, scope, last_event_id or 0),
        ping=res.settings.events_keepalive_s,
        # Proxies such as nginx would otherwise buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# Plain sessions, not SessionDep: a yield dependency would hold its connection for as long
# as the stream stays open.
@router.get(
    "/batches/{batch_id}/events",
    response_class=EventSourceResponse,
    responses=STREAM_RESPONSES,
    summary="Live state changes of a batch's jobs (Server-Sent Events)",
)
def batch_events(
    batch_id: str, res: ResourcesDep, tenant: TenantDep, last_event_id: LastEventId = None
) -> EventSourceResponse:
    with res.sessions() as session:
        batch = batch_or_404(session, batch_id, tenant)
    return _response(res, Scope(batch_id=batch.id), last_event_id)


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses=STREAM_RESPONSES,
    summary="Live state changes of a job (Server-Sent Events)",
)
def job_events(
    job_id: str, res: ResourcesDep, tenant: TenantDep, last_event_id: LastEventId = None
) -> EventSourceResponse:
    with res.sessions() as session:
        job = job_or_404(session, job_id, tenant)
    return _response(res, Scope(job_id=job.id), last_event_id)
