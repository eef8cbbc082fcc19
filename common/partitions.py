"""Day partitions of ``jobs`` and ``job_events`` (migration 0015): their names, bounds,
and the upkeep that creates today's and the next days' ahead of need.

Layout: ``jobs`` is RANGE partitioned on ``id``, ``job_events`` on ``job_id``, with the
same bounds, so a job and its events are in the partitions of one day and go together.
Job ids are UUIDv7 (common.ids): a day's partition holds the ids from its first
millisecond (``ids.day_bound``) to the next day's. All partitions live in the schema
``job_partitions``, out of the way of the tables the ORM maps:

- ``jobs_pYYYYMMDD`` / ``job_events_pYYYYMMDD``: one UTC day;
- ``jobs_legacy`` / ``job_events_legacy``: the tables as they were before 0015, attached
  in place (nothing copied) for ids from 2100-01-01's bound up: the UUIDv4 ids of old
  jobs are spread over the whole id space, and 98.5 % of them fall there;
- ``jobs_default`` / ``job_events_default``: everything else: the other 1.5 % of old
  jobs, and any new job whose day has no partition (never refused, never lost).

The foreign key from an event to its job is declared per pair of partitions
(``job_events_pD.job_id`` references ``jobs_pD.id``, ON DELETE CASCADE), not on the
parents: equivalent, as an event is always in its job's day, and it lets a day be
dropped without Postgres checking the rest of ``job_events`` for references to it.

Creating a day's partition while the default holds rows of that day (an old v4 id that
falls in it: about 3 in 10^7 old rows per day; or jobs made while upkeep was behind)
would fail: they are moved into the new partition first, in the same transaction,
found through the default's primary key (an index range scan). Attaching then checks
the default holds nothing of the day: a scan of the default, which holds 1.5 % of the
old rows, under an ACCESS EXCLUSIVE lock on it, tried with a lock timeout."""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from hepato.common.ids import day_bound

log = logging.getLogger(__name__)

SCHEMA = "job_partitions"
JOBS_DEFAULT = f"{SCHEMA}.jobs_default"
EVENTS_DEFAULT = f"{SCHEMA}.job_events_default"
# The old tables' range: from this day's bound to the top of the id space.
LEGACY_FROM = date(2100, 1, 1)
# pg_try_advisory_lock(4711, 6): one upkeep at a time across processes (retention is 5).
LOCK_CLASS, LOCK_ID = 4711, 6
# An upkeep that waits this long for a lock gives up until the next sweep: days are made
# ahead of need, and a lock request queued behind a long reader would stall writers.
LOCK_TIMEOUT_MS = 2000
# How often each worker's sweeper looks for missing days (a catalog read when none is).
UPKEEP_INTERVAL_S = 600.0

_DAY_NAME = re.compile(r"^jobs_p(\d{8})$")


def jobs_partition(day: date) -> str:
    return f"{SCHEMA}.jobs_p{day:%Y%m%d}"


def events_partition(day: date) -> str:
    return f"{SCHEMA}.job_events_p{day:%Y%m%d}"


def bounds(day: date) -> tuple[str, str]:
    """The ids of ``day``: from the first (inclusive) to the next day's (exclusive)."""
    return str(day_bound(day)), str(day_bound(day + timedelta(days=1)))


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def attached_days(conn: Connection) -> list[date]:
    """The days that have a partition of ``jobs``, oldest first."""
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'jobs'::regclass"
        )
    ).scalars()
    days = []
    for name in names:
        match = _DAY_NAME.match(name)
        if match:
            days.append(datetime.strptime(match.group(1), "%Y%m%d").date())
    return sorted(days)


def create_day(conn: Connection, day: date) -> int:
    """Give ``day`` its partitions of both tables, in the caller's transaction, moving
    its rows out of the defaults first; how many jobs were moved. Nothing when it has
    them already."""
    if day >= LEGACY_FROM:
        raise ValueError(f"{day} is in the legacy partition's range")
    # Parents, then the defaults, as writers take them: no lock-order deadlock.
    conn.execute(text("LOCK TABLE ONLY jobs, ONLY job_events IN SHARE UPDATE EXCLUSIVE MODE"))
    conn.execute(
        text(f"LOCK TABLE ONLY {JOBS_DEFAULT}, ONLY {EVENTS_DEFAULT} IN ACCESS EXCLUSIVE MODE")
    )
    if day in attached_days(conn):
        return 0
    lo, hi = bounds(day)
    jobs, events = jobs_partition(day), events_partition(day)
    span = {"lo": lo, "hi": hi}
    conn.execute(text(f"CREATE TABLE {jobs} (LIKE jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    conn.execute(
        text(f"CREATE TABLE {events} (LIKE job_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    )
    # Rows of the day in the defaults: copied, then deleted (events first: the jobs'
    # delete would cascade to them). No trigger of the parents fires: the counts of
    # job_state_counts stay right, as no job came or went.
    inside = "{key} >= CAST(:lo AS uuid) AND {key} < CAST(:hi AS uuid)"
    moved = conn.execute(
        text(f"INSERT INTO {jobs} SELECT * FROM {JOBS_DEFAULT} WHERE " + inside.format(key="id")),
        span,
    ).rowcount
    if moved:
        in_events = inside.format(key="job_id")
        conn.execute(
            text(f"INSERT INTO {events} SELECT * FROM {EVENTS_DEFAULT} WHERE {in_events}"), span
        )
        conn.execute(text(f"DELETE FROM {EVENTS_DEFAULT} WHERE {in_events}"), span)
        conn.execute(text(f"DELETE FROM {JOBS_DEFAULT} WHERE " + inside.format(key="id")), span)
    conn.execute(
        text(f"ALTER TABLE jobs ATTACH PARTITION {jobs} FOR VALUES FROM ('{lo}') TO ('{hi}')")
    )
    conn.execute(
        text(
            f"ALTER TABLE {events} ADD CONSTRAINT job_events_p{day:%Y%m%d}_job_id_fkey"
            f" FOREIGN KEY (job_id) REFERENCES {jobs} (id) ON DELETE CASCADE"
        )
    )
    conn.execute(
        text(
            f"ALTER TABLE job_events ATTACH PARTITION {events} FOR VALUES FROM ('{lo}') TO ('{hi}')"
        )
    )
    if moved:
        log.info("partition of %s made; %d jobs moved into it from the default", day, moved)
    return moved


def wanted_days(days_ahead: int, today: date | None = None) -> list[date]:
    """Today (UTC) and the ``days_ahead`` days after it."""
    first = today or datetime.now(UTC).date()
    return [first + timedelta(days=i) for i in range(days_ahead + 1)]


def ensure(engine: Engine, days_ahead: int, *, today: date | None = None) -> list[date] | None:
    """Make the partitions of today and the next ``days_ahead`` days that are missing, a
    day per transaction; the days made. None: another process is at it (a tried lock,
    never waited for). A lock not had within LOCK_TIMEOUT_MS ends the upkeep early: the
    days not made yet are made by the next call, and their jobs meanwhile go to the
    default partition."""
    made: list[date] = []
    with engine.connect() as conn:
        held = conn.execute(
            text("SELECT pg_try_advisory_lock(:c, :i)"), {"c": LOCK_CLASS, "i": LOCK_ID}
        ).scalar_one()
        conn.commit()
        if not held:
            return None
        try:
            have = set(attached_days(conn))
            conn.commit()
            for day in wanted_days(days_ahead, today):
                if day in have:
                    continue
                try:
                    with conn.begin():
                        conn.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
                        create_day(conn, day)
                except OperationalError as error:
                    if getattr(error.orig, "sqlstate", None) != "55P03":  # lock_not_available
                        raise
                    log.warning(
                        "partition upkeep: %s not made, a lock was busy; retried later", day
                    )
                    break
                made.append(day)
        finally:
            try:
                conn.execute(
                    text("SELECT pg_advisory_unlock(:c, :i)"), {"c": LOCK_CLASS, "i": LOCK_ID}
                )
                conn.commit()
            except Exception:
                conn.invalidate()  # a pooled connection must not keep the lock
                raise
    return made
