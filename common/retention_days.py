"""Retention by the day: a day's partitions of ``jobs`` and ``job_events``
(common.partitions) dropped whole once every job in them may go, instead of deleted row
by row. common.retention runs this first, then its chunked deletes for the rest.

A day is *due* once it ended before the cutoff (no job can be made in it any more).
A due day:

- that holds an unfinished job (pending, processing: an index probe) is left to the
  chunked deletes, which take its finished jobs as before;
- else is *surveyed*: one read of its jobs partition (a sequential scan, nothing
  locked but the read itself) gives its jobs per model, tenant and state, its batches,
  its images' object keys, and whether each job finished before the cutoff. A job that
  finished later, or one of a slide that has not finished that long ago, keeps the whole
  day: it *waits*, untouched, until they may go (then it is surveyed again);
- else is dropped, in one short transaction: both parents locked (ACCESS EXCLUSIVE,
  with a lock timeout: a drop that cannot have them at once is tried at the next pass),
  the day probed once more for unfinished jobs, the counts of job_state_counts lowered
  by the survey's (a DROP fires no DELETE trigger), and the two partitions dropped.
  Nothing is scanned under the lock. The survey's counts are the day's at the drop:
  finished jobs are never written again, and no job is made in a past day.

The chunked deletes skip every day partition but the due ones with unfinished jobs
(``skipped_ranges``): rows there go by drops, not one by one. So a finished job is kept
at least the retention period, and at most until its day may go as a whole (a day
after, or as long as a job of its day or slide is still running)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, text

from hepato.common import partitions
from hepato.common.constants import TERMINAL_STATES, JobState

_UNFINISHED_STATES = sorted(s.value for s in JobState if s not in TERMINAL_STATES)
_UNFINISHED = ", ".join(f"'{s}'" for s in _UNFINISHED_STATES)

# Per (model, tenant, state, batch): how many, whether all finished before the cutoff,
# the latest finish, and the images' keys (a plan's or tile's object is its slide's).
_SURVEY = """
    SELECT model, tenant, state, batch_id, count(*) AS n,
           bool_and(coalesce(finished_at < :cutoff, false)) AS gone,
           max(finished_at) AS last,
           array_agg(object_key) FILTER (WHERE kind = 'image') AS keys
    FROM {jobs} GROUP BY model, tenant, state, batch_id
"""
_KEEPING_SLIDES = text(
    "SELECT s.id FROM slides s WHERE s.id = ANY(:batches)"
    " AND (s.finished_at IS NULL OR s.finished_at >= :cutoff)"
)


@dataclass
class Day:
    """What a survey found in a day that may be dropped."""

    day: date
    jobs: int = 0
    events: int = 0
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    batches: set[uuid.UUID] = field(default_factory=set)
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Wait:
    until: datetime | None  # the latest finish in the day: it may go once that is past
    slides: frozenset[uuid.UUID]  # slides that keep it: looked at again each pass


# Days that waited, per process: surveyed again only once what kept them may be gone.
_waiting: dict[date, _Wait] = {}


def due_days(conn: Connection, cutoff: datetime) -> list[date]:
    """Days with partitions that ended before ``cutoff``, oldest first."""
    return [
        d
        for d in partitions.attached_days(conn)
        if partitions.day_start(d + timedelta(days=1)) <= cutoff
    ]


def has_unfinished(conn: Connection, day: date) -> bool:
    return (
        conn.execute(
            text(
                f"SELECT 1 FROM {partitions.jobs_partition(day)}"
                f" WHERE state IN ({_UNFINISHED}) LIMIT 1"
            )
        ).first()
        is not None
    )


def skipped_ranges(
    conn: Connection, cutoff: datetime, taken: frozenset[date] = frozenset()
) -> list[tuple[str, str]]:
    """The id ranges the chunked deletes leave alone: every day partition but the due
    ones that hold unfinished jobs (and ``taken``), merged where they touch."""
    due = set(due_days(conn, cutoff))
    ranges: list[tuple[str, str]] = []
    for day in partitions.attached_days(conn):
        if day in taken or (day in due and has_unfinished(conn, day)):
            continue
        lo, hi = partitions.bounds(day)
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


def waits(conn: Connection, day: date, cutoff: datetime) -> bool:
    """Whether a survey of ``day`` would still find something that keeps it."""
    wait = _waiting.get(day)
    if wait is None:
        return False
    if wait.until is not None and wait.until >= cutoff:
        return True
    if (
        wait.slides
        and conn.execute(_KEEPING_SLIDES, {"batches": list(wait.slides), "cutoff": cutoff}).first()
    ):
        return True
    del _waiting[day]
    return False


def survey(conn: Connection, day: date, cutoff: datetime) -> Day | None:
    """What dropping ``day`` would remove; None if something in it must stay (then
    remembered, so the day is not read again before that may have changed)."""
    out = Day(day)
    last: datetime | None = None
    all_gone = True
    rows = conn.execute(
        text(_SURVEY.format(jobs=partitions.jobs_partition(day))), {"cutoff": cutoff}
    )
    for model, tenant, state, batch_id, n, gone, latest, keys in rows:
        if state in _UNFINISHED_STATES:
            return None  # begun since the probe: the chunked deletes' day
        all_gone = all_gone and bool(gone)
        if latest is not None and (last is None or latest > last):
            last = latest
        out.jobs += n
        out.counts[(model, tenant, state)] = out.counts.get((model, tenant, state), 0) + n
        if batch_id is not None:
            out.batches.add(batch_id)
        out.keys.extend(keys or [])
    keeping = frozenset(
        conn.execute(_KEEPING_SLIDES, {"batches": list(out.batches), "cutoff": cutoff}).scalars()
    )
    if not all_gone or keeping:
        until = None
        if not all_gone:
            # A finished job without a finish time (none is written so) is never old
            # enough: its day is not read again in this process.
            late = last is not None and last >= cutoff
            until = last if late else datetime.max.replace(tzinfo=UTC)
        _waiting[day] = _Wait(until, keeping)
        return None
    out.events = int(
        conn.execute(text(f"SELECT count(*) FROM {partitions.events_partition(day)}")).scalar_one()
    )
    return out


def drop(conn: Connection, found: Day, lock_timeout_ms: int) -> bool:
    """Drop the surveyed day, in the caller's transaction (to commit at once); False if
    it now holds an unfinished job (nothing done: roll back)."""
    conn.execute(text(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}"))
    # Parents first, as writers take them: no lock-order deadlock.
    conn.execute(text("LOCK TABLE ONLY jobs, ONLY job_events IN ACCESS EXCLUSIVE MODE"))
    if has_unfinished(conn, found.day):
        return False
    if found.counts:
        keys = list(found.counts)
        conn.execute(
            text(
                "INSERT INTO job_state_deltas (model, tenant, state, n)"
                " SELECT * FROM unnest(CAST(:models AS text[]), CAST(:tenants AS text[]),"
                " CAST(:states AS text[]), CAST(:ns AS bigint[]))"
            ),
            {
                "models": [k[0] for k in keys],
                "tenants": [k[1] for k in keys],
                "states": [k[2] for k in keys],
                "ns": [-found.counts[k] for k in keys],
            },
        )
    # The events' partition first: it holds the reference to the jobs'.
    conn.execute(text(f"DROP TABLE {partitions.events_partition(found.day)}"))
    conn.execute(text(f"DROP TABLE {partitions.jobs_partition(found.day)}"))
    _waiting.pop(found.day, None)
    return True
