"""Waiting for jobs to finish on behalf of every ``/v1/predict`` caller of one gateway
process, at the cost of at most one Postgres read per round however many callers wait.

A caller costs a future and a callback on the process's wake-up hub (gateway.wakeups),
never a thread or a connection. It subscribes to its job's "finished" channel before the
job exists (its id is chosen first), so the job's one wake-up is the one that matters and
no read is spent before it. A worker that completes a lone job sends the committed row's
answer as that wake-up's message (common.event_log.answer): the caller is answered from
it, with no read at all. Any other wake-up (a failure, an answer too long to send, a
reconnect of the hub) marks the job due; one task reads every due job in one query (in
a worker thread) and resolves the callers whose job has finished. Every
``reread_s`` every watched job is due, so a lost wake-up (Redis restarted, flushed) costs
a caller at most that, never its answer; a Postgres outage costs it the wait (it gets the
202 at its timeout), never a 5xx for a job that was accepted."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import anyio
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from hepato.common.constants import TERMINAL_STATES, job_finished_channel
from hepato.common.metrics import PREDICT_WAITING
from hepato.common.tables import Job
from hepato.gateway.wakeups import WakeupHub

log = logging.getLogger(__name__)

# Every waited-for job is read again at least this often, s.
REREAD_S = 1.0
# Ids per query: a few rounds cover thousands of callers.
CHUNK = 1000
# Due jobs read whole in one statement, finished or not; past this, states first.
WHOLE_ROWS_UP_TO = 16
# After a failed read (Postgres down), the next round waits this long, s.
ERROR_PAUSE_S = 1.0


@dataclass
class Read:
    """One round's read: the state of every due job that has a row, and the whole row of
    those that have finished (the caller's answer, with no read of its own)."""

    states: dict[uuid.UUID, str]
    finished: dict[uuid.UUID, Job]


def _read(engine: Engine, ids: list[uuid.UUID]) -> Read:
    # A few waiters (the real-time case): their whole rows in one statement. Many: the
    # states first, a cheap read of every waiter each round, and whole rows (an ORM load)
    # only of the few that finished, so thousands of waiters cost the loop little.
    # Autocommit: reads need no BEGIN and ROLLBACK round trips.
    read = Read({}, {})
    with Session(_autocommit(engine), expire_on_commit=False) as session:
        if len(ids) <= WHOLE_ROWS_UP_TO:
            for job in session.scalars(select(Job).where(Job.id.in_(ids))):
                read.states[job.id] = job.state
                if job.state in TERMINAL_STATES:
                    read.finished[job.id] = job
            return read
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            states = session.execute(select(Job.id, Job.state).where(Job.id.in_(chunk)))
            read.states.update({job_id: state for job_id, state in states})
        done = [job_id for job_id, state in read.states.items() if state in TERMINAL_STATES]
        for start in range(0, len(done), CHUNK):
            rows = session.scalars(select(Job).where(Job.id.in_(done[start : start + CHUNK])))
            read.finished.update({job.id: job for job in rows})
    return read


def _answer(job_id: uuid.UUID, data: bytes) -> Job | None:
    """The finished row a wake-up's message carries (job_statements.ANSWER_COLUMNS, as
    JSON), unattached to any session; None for a plain wake-up ("1"), or one that does
    not hold this job's answer (the caller then reads the row)."""
    if data == b"1":
        return None
    try:
        fields = json.loads(data)
        if uuid.UUID(fields["id"]) != job_id:
            return None
        fields["id"] = job_id
        for key in _TIMES:
            if fields.get(key) is not None:
                fields[key] = datetime.fromisoformat(fields[key])
        return Job(**fields)
    except (ValueError, KeyError, TypeError):
        log.warning("a finished job's wake-up held no answer; reading the job instead")
        return None


_TIMES = ("inferred_at", "finished_at")


@functools.cache
def _autocommit(engine: Engine) -> Engine:
    # Made once: an engine's options copy costs more than the read of a few rows.
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@dataclass(frozen=True)
class Finished:
    """A waited-for job that has finished: its row as read then (None: the row is gone)."""

    job: Job | None


class FinishWatch:
    """The terminal states of the jobs callers are waiting for."""

    def __init__(self, engine: Engine, hub: WakeupHub, reread_s: float = REREAD_S) -> None:
        self.engine = engine
        self.hub = hub
        self.reread_s = reread_s
        self._waiters: dict[uuid.UUID, set[asyncio.Future[Job | None]]] = {}
        # Waited-for jobs known to have been created: only their missing row is an answer.
        self._created: set[uuid.UUID] = set()
        self._due: set[uuid.UUID] = set()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="finish-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def watching(
        self, job_id: uuid.UUID
    ) -> AsyncIterator[Callable[[float], Awaitable[Finished | None]]]:
        """Subscribed to ``job_id`` while inside, whether or not the job exists yet: create
        the job inside, then ``await wait(timeout_s)`` for it once it has finished (its
        row, None if the row is gone), or None if it has not within ``timeout_s``."""
        future: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(job_id, set())
        waiters.add(future)

        async def wait(timeout_s: float) -> Finished | None:
            # From here on, no row means the job is gone (until now: not yet created).
            self._created.add(job_id)
            with anyio.move_on_after(timeout_s), PREDICT_WAITING.track_inprogress():
                return Finished(await future)
            return None

        try:
            channel = job_finished_channel(str(job_id))
            async with self.hub.listen(channel, lambda data: self._woken(job_id, data)):
                yield wait
        finally:
            waiters.discard(future)
            if not waiters and self._waiters.get(job_id) is waiters:
                del self._waiters[job_id]
                self._created.discard(job_id)

    def _woken(self, job_id: uuid.UUID, data: bytes | None) -> None:
        job = None if data is None else _answer(job_id, data)
        if job is None:
            self._mark(job_id)
            return
        for future in self._waiters.get(job_id, ()):
            if not future.done():
                future.set_result(job)

    def _mark(self, job_id: uuid.UUID) -> None:
        self._due.add(job_id)
        self._kick.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        everyone_at = loop.time() + self.reread_s
        while True:
            with anyio.move_on_after(max(0.0, everyone_at - loop.time())):
                await self._kick.wait()
            self._kick.clear()
            due, self._due = self._due, set()
            if loop.time() >= everyone_at:
                due.update(self._waiters)
                everyone_at = loop.time() + self.reread_s
            due.intersection_update(self._waiters)
            if not due:
                continue
            # Created before the read began: only for these does a missing row mean gone.
            # (A job committed while the read ran may be missing from what it saw.)
            created = due & self._created
            try:
                read = await anyio.to_thread.run_sync(_read, self.engine, list(due))
            except Exception:
                log.warning("could not read the states of %d waited-for jobs", len(due))
                self._due |= due
                await anyio.sleep(ERROR_PAUSE_S)
                continue
            for job_id in due:
                if job_id in read.finished:
                    job: Job | None = read.finished[job_id]
                elif job_id not in read.states and job_id in created:
                    job = None  # its row is gone
                else:
                    continue  # still running, or read before its submission committed
                for future in self._waiters.get(job_id, ()):
                    if not future.done():
                        future.set_result(job)


# Async, so that FastAPI calls it on the event loop, not in the thread pool.
async def get_finish_watch(conn: HTTPConnection) -> FinishWatch:
    watch: FinishWatch = conn.app.state.finish_watch
    return watch
