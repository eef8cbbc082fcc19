"""The job event log: one ``job_events`` row per state change, written in the same
transaction as the change, and a Redis wake-up published after the commit.

Postgres is the truth; the wake-up only saves readers latency. Readers re-read the table
on every wake-up and at a bounded interval, so a lost publish (Redis down, flushed,
restarted) delays an event and never drops it.

Order without a lock: a bigserial is drawn at insert time but becomes visible at commit,
so a reader could see id 11 before id 10 commits and move its cursor past 10 for good.
Each row also carries its writing transaction's id (``xid``), and a reader takes only
rows with an xid below its snapshot's xmin, in ``(xid, id)`` order: every transaction
below that xmin has ended, and every transaction still to write draws an xid at or
above it, so no event can ever appear below a cursor taken from such rows. The cost: an
event is read once every older transaction still writing has ended, so one long write
transaction anywhere in the cluster delays delivery by its length.

Finishing a batch once: the transactions that end the last jobs of a batch with a
webhook, or of a slide, run their finish checks one after another under an advisory
lock of that batch (``_finish_locks``), so exactly one of them sees the last job end.
Other batches' writers take no lock at all."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Insert,
    Row,
    Select,
    Update,
    func,
    insert,
    literal,
    select,
    tuple_,
)
from sqlalchemy.orm import QueryableAttribute

from hepato.common import slide_finish, wake_publish, webhooks
from hepato.common.constants import (
    TERMINAL_STATES,
    batch_events_channel,
    job_events_channel,
    job_finished_channel,
)
from hepato.common.tables import Batch, Job, JobEvent, Slide, Xid8

log = logging.getLogger(__name__)

_EVENT_COLUMNS = ["job_id", "batch_id", "tenant", "state", "error", "at"]
# The advisory-lock namespace (first key) of a batch's finish; the second is from its id.
_FINISH_LOCK_SPACE = 4711003
_WAKE = "hepato.events.wake"
_ANSWERS = "hepato.events.answers"
# A lone job's answer longer than this is not sent with its wake-up (its caller reads
# the row instead), characters.
ANSWER_MAX_CHARS = 256 * 1024


def record(
    conn: Connection, job_ids: Collection[uuid.UUID], *, where: ColumnElement[bool] | None = None
) -> None:
    """Log the current state of ``job_ids`` (as this transaction left them) as one event
    each. Call once per transition, after its writes, inside ``transaction``. ``where``
    instead of ids names a set too large for a parameter list (a slide's tiles, created
    together); their wake-ups go to their batch's channel only, as no one can be
    watching jobs whose ids were never published. A transaction that ends jobs of
    batches should do so in one call: the finish locks are taken in one sorted order per
    call, and two calls could take them in two."""
    if where is None:
        if not job_ids:
            return
        where = Job.id.in_(list(job_ids))
        per_job = True
    else:
        per_job = False
    rows = conn.execute(
        insert(JobEvent)
        .from_select(
            _EVENT_COLUMNS,
            select(Job.id, Job.batch_id, Job.tenant, Job.state, Job.error, func.now())
            .where(where)
            .order_by(Job.id),
        )
        .returning(JobEvent.job_id, JobEvent.batch_id, JobEvent.state)
    ).all()
    _recorded(conn, [(job, batch, state) for job, batch, state in rows], per_job=per_job)


def record_change(
    conn: Connection,
    change: Insert | Update,
    *columns: ColumnElement[Any] | QueryableAttribute[Any],
) -> list[Row[Any]]:
    """Run ``change`` (an INSERT or UPDATE of jobs) and log the state it leaves each row
    in, in one statement (see ``logged``): a microbatch's write is one round trip.
    Returns one row per job changed, by id: its ``id``, ``batch_id``, ``tenant``,
    ``state``, ``error``, then ``columns`` as the change left them. As ``record``, once
    per transition, inside ``transaction``."""
    return record_logged(conn, logged(change, *columns))


def record_logged(
    conn: Connection,
    statement: Select[Any],
    params: Mapping[str, Any] | None = None,
    *,
    follow_up: bool = True,
) -> list[Row[Any]]:
    """``record_change`` of a statement built by ``logged`` beforehand, with its bound
    ``params``: a hot path builds its statement once (building one takes longer than
    Postgres takes to run it). ``follow_up=False``: the caller knows that no changed job
    has a batch or a webhook (common.jobs.ends_alone), so nothing is looked up for them."""
    rows = conn.execute(statement, dict(params or {})).all()
    recorded = [(row.id, row.batch_id, row.state) for row in rows]
    if follow_up:
        _recorded(conn, recorded, per_job=True)
    else:
        _wake(conn, recorded, per_job=True)
    return list(rows)


def logged(
    change: Insert | Update, *columns: ColumnElement[Any] | QueryableAttribute[Any]
) -> Select[Any]:
    """``change`` and the events' INSERT as data-modifying CTEs of one SELECT of the rows
    changed (the columns ``record_change`` returns)."""
    keys = (Job.id, Job.batch_id, Job.tenant, Job.state, Job.error)
    # Labelled: the CTE's columns must not repeat a name (``id`` is often asked for).
    extra = [column.label(f"c{i}") for i, column in enumerate(columns)]
    changed = change.returning(*keys, *extra).cte("changed")
    events = (
        insert(JobEvent)
        .from_select(
            _EVENT_COLUMNS,
            select(
                changed.c.id,
                changed.c.batch_id,
                changed.c.tenant,
                changed.c.state,
                changed.c.error,
                func.now(),
            ).order_by(changed.c.id),
        )
        .returning(JobEvent.job_id)
        .cte("logged")
    )
    return select(changed).add_cte(events).order_by(changed.c.id)


def _recorded(
    conn: Connection,
    recorded: list[tuple[uuid.UUID, uuid.UUID | None, str]],
    *,
    per_job: bool,
) -> None:
    """What follows the events' insert: a batch's finish, and the wake-ups to publish."""
    finishing = _finish_locks(
        conn, {batch for _, batch, state in recorded if state in TERMINAL_STATES}
    )
    # Only jobs whose end can do something are looked at again: a lone job (its own
    # webhook) and jobs of the batches just locked.
    concerned = [r for r in recorded if r[1] is None or r[1] in finishing]
    webhooks.enqueue_finished(conn, concerned)
    slide_finish.finish_slides(conn, [r for r in concerned if r[1] is not None])
    _wake(conn, recorded, per_job=per_job)


def _wake(
    conn: Connection,
    recorded: list[tuple[uuid.UUID, uuid.UUID | None, str]],
    *,
    per_job: bool,
) -> None:
    """The channels to publish on once the change has committed."""
    wake = conn.info.setdefault(_WAKE, set())
    wake.update(batch_events_channel(str(batch_id)) for _, batch_id, _ in recorded if batch_id)
    if per_job:
        wake.update(job_events_channel(str(job_id)) for job_id, _, _ in recorded)
        wake.update(
            job_finished_channel(str(job_id))
            for job_id, batch_id, state in recorded
            if batch_id is None and state in TERMINAL_STATES
        )


def answer(conn: Connection, answers: Mapping[uuid.UUID, str | None]) -> None:
    """Send each job's answer (JSON text) as the message of its "finished" wake-up, once
    this transaction has committed; a job without one (None, or too long) wakes its
    caller with a plain "1", and the caller reads the row."""
    messages = conn.info.setdefault(_ANSWERS, {})
    for job_id, text in answers.items():
        if text is not None and len(text) <= ANSWER_MAX_CHARS:
            messages[job_finished_channel(str(job_id))] = text


def _finish_locks(conn: Connection, batches: set[uuid.UUID | None]) -> set[uuid.UUID]:
    """Lock, for this transaction, each of ``batches`` whose end does something (a
    webhook, a slide to finish), so that the finish checks after it run one transaction
    at a time per batch; return those batches. Each check is a statement of its own after
    the lock: under READ COMMITTED it sees what the lock's previous holder committed."""
    batches.discard(None)
    known = {b for b in batches if b is not None and b in _finishes}
    unknown = [b for b in batches if b is not None and b not in _finishes]
    if unknown:
        found = set(
            conn.execute(
                select(Batch.id)
                .where(Batch.id.in_(unknown), Batch.callback_url.is_not(None))
                .union(select(Slide.id).where(Slide.id.in_(unknown)))
            ).scalars()
        )
        for batch in unknown:
            _remember(batch, batch in found)
        known.update(unknown)
    finishing = {b for b in known if _finishes.get(b, True)}
    # In one order everywhere, so two transactions never wait on each other's.
    for key in sorted({_lock_key(batch) for batch in finishing}):
        conn.execute(select(func.pg_advisory_xact_lock(_FINISH_LOCK_SPACE, key)))
    return finishing


# Whether a batch's end does something (a webhook, a slide): fixed when the batch is
# created, so each process asks once per batch (a microbatch's write is then one
# statement). Bounded: the oldest answers are forgotten and asked again.
_finishes: OrderedDict[uuid.UUID, bool] = OrderedDict()
_FINISHES_KEPT = 10_000
_finishes_lock = threading.Lock()


def finishes_nothing(batch: uuid.UUID) -> bool:
    """Whether this process already knows that ``batch``'s end does nothing (no webhook,
    no slide): its jobs' ends then need no finish lock and no follow-up read."""
    return _finishes.get(batch) is False


def _remember(batch: uuid.UUID, finishes: bool) -> None:
    with _finishes_lock:
        _finishes[batch] = finishes
        while len(_finishes) > _FINISHES_KEPT:
            _finishes.popitem(last=False)


def _lock_key(batch_id: uuid.UUID) -> int:
    # Two batches that share a key only wait on each other now and then.
    return int.from_bytes(batch_id.bytes[:4], "big", signed=True)


@contextmanager
def transaction(engine: Engine, *, autocommit: bool = False) -> Iterator[Connection]:
    """``engine.begin()`` that publishes the wake-ups of the events recorded in it once
    it has committed (never before: a reader woken early would find nothing new).
    ``autocommit``: each statement commits on its own, without the BEGIN and COMMIT
    round trips; only for one statement that writes a change with its events
    (``record_logged``), which is then atomic by itself."""
    with engine.connect() if autocommit else engine.begin() as conn:
        if autocommit:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        # Taken now: once a statement has met a lost connection, ``conn.info`` raises
        # PendingRollbackError, which would hide the OperationalError the callers retry.
        info = conn.info
        try:
            yield conn
        finally:
            # Pooled connections keep .info: clear it even when the transaction fails.
            channels: set[str] = info.pop(_WAKE, set())
            messages: dict[str, str] = info.pop(_ANSWERS, {})
    wake_publish.publish(engine, channels, messages)


# Where a stream resumes: after this (xid, id); (0, 0) is from the start.
Cursor = tuple[int, int]
START: Cursor = (0, 0)


def parse_cursor(text: str) -> Cursor:
    """A cursor from an event id: ``"<xid>-<id>"``, or a bare id, as given before ids
    had an xid (those events all have xid 0). ValueError if it is neither."""
    xid, sep, event_id = text.strip().rpartition("-")
    if not sep:
        xid = "0"
    if not (xid.isascii() and xid.isdigit() and event_id.isascii() and event_id.isdigit()):
        raise ValueError(f"not an event id: {text!r}")
    cursor = int(xid), int(event_id)
    if cursor[0] >= 2**64 or cursor[1] >= 2**63:  # beyond xid8 and bigint
        raise ValueError(f"not an event id: {text!r}")
    return cursor


def format_cursor(cursor: Cursor) -> str:
    return f"{cursor[0]}-{cursor[1]}"


@dataclass(frozen=True)
class Event:
    id: int
    job_id: uuid.UUID
    batch_id: uuid.UUID | None
    state: str
    error: str | None
    at: datetime
    xid: int = 0

    @property
    def cursor(self) -> Cursor:
        return self.xid, self.id

    def data(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "batch_id": str(self.batch_id) if self.batch_id else None,
            "state": self.state,
            "error": self.error,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class Read:
    """Events that may be sent, and whether later ones (committed, or not yet) wait
    behind a transaction still running: read again soon, not at the usual interval."""

    events: list[Event]
    held: bool


def horizon() -> ColumnElement[Any]:
    """The xid below which every transaction has ended, as of this statement's snapshot."""
    return select(func.pg_snapshot_xmin(func.pg_current_snapshot())).scalar_subquery()


def read(
    conn: Connection,
    after: Cursor,
    *,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    limit: int = 1000,
) -> Read:
    """Events of one job or one batch after the cursor ``after``, in log order: those of
    transactions below the horizon only, so a later read never finds one below them."""
    scope = JobEvent.job_id == job_id if job_id is not None else JobEvent.batch_id == batch_id
    position = tuple_(JobEvent.xid, JobEvent.id)
    # Read one row past the page, unfiltered: in (xid, id) order those below the horizon
    # come first, and a row at or above it tells that more are held back.
    rows = conn.execute(
        select(
            JobEvent.id,
            JobEvent.job_id,
            JobEvent.batch_id,
            JobEvent.state,
            JobEvent.error,
            JobEvent.at,
            JobEvent.xid,
            (JobEvent.xid < horizon()).label("ended"),
        )
        .where(
            scope,
            position > tuple_(literal(after[0], Xid8()), literal(after[1], BigInteger())),
        )
        .order_by(JobEvent.xid, JobEvent.id)
        .limit(limit + 1)
    ).all()
    events = [Event(*row[:7]) for row in rows[:limit] if row.ended]
    held = any(not row.ended for row in rows)
    return Read(events, held)


def last(conn: Connection, batch_id: uuid.UUID) -> Cursor:
    """The cursor of a batch's last event that a read would send now (START if none)."""
    row = conn.execute(
        select(JobEvent.xid, JobEvent.id)
        .where(JobEvent.batch_id == batch_id, JobEvent.xid < horizon())
        .order_by(JobEvent.xid.desc(), JobEvent.id.desc())
        .limit(1)
    ).first()
    return (row.xid, row.id) if row else START
