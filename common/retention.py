"""Retention: finished jobs older than HEPATO_RETENTION_DAYS deleted with their events,
emptied batches, finished slides, expired idempotency keys, settled webhook deliveries,
and then their objects in the store.

First whole days: a day's partitions of ``jobs`` and ``job_events`` are dropped once
every job in them may go (common.retention_days), then, in transactions of their own,
the day's batches left without a job and their slides, then the objects of its images
and slides, as below (a crash in between leaves empty batches and orphan objects). Then
the chunked deletes, for what no drop takes: the default and legacy partitions (ids
made before 0015, or in a day that had no partition) and days that still hold an
unfinished job. What goes, per chunk of ``chunk`` jobs, in one short transaction:

- jobs in a terminal state (done, failed, canceled, expired) whose ``finished_at`` is
  before the cutoff, taken with ``FOR UPDATE SKIP LOCKED`` so no writer waits for the
  pass, nor the pass for a writer; the jobs of a whole slide only once the slide itself
  finished before the cutoff (its summary and viewer read its tiles until then);
- their ``job_events`` (the ON DELETE CASCADE of each day's ``job_events.job_id``,
  written out so it can be counted);
- each batch the chunk touched that has no job left, and with it its ``slides`` row
  (``slides.id`` references ``batches.id``): a batch that keeps a recent or unfinished
  job is kept, with its ``total`` as submitted.

After the commit, the chunk's objects are deleted: each image job's upload, and each
deleted slide's file (its de-identified copy when it has one: the original was deleted
at planning), thumbnail and tissue mask. Rows first: an object without a row is garbage,
a row without its object would be a broken job. A crash between the commit and the
deletes leaves orphan objects; their keys are dated (``uploads/YYYY/MM/DD/``, and
``slides/<id>/``), so a listing of the days older than the cutoff, less the keys
``jobs`` and ``slides`` still name, finds them. Local slide caches (workers', gateways')
are not touched: they are bounded by ``slide_cache_bytes`` and evict what is not read.

Never touched: unfinished jobs, and ``audit_events`` (append-only, a trigger refuses
DELETE; its rows name object ids only, which may outlive their jobs). The
``job_state_counts`` triggers count the DELETEs, and a day's drop takes its jobs off
the counts in its transaction, so ``hepato_jobs`` counts the jobs that exist. One pass
at a time across all processes: a session advisory lock, tried, never waited for."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from minio.deleteobjects import DeleteObject
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from hepato.common import retention_days
from hepato.common.constants import TERMINAL_STATES
from hepato.common.storage import ObjectStore

log = logging.getLogger(__name__)

# pg_try_advisory_lock(4711, 5): 4711 is this project's class of advisory locks
# (0012 folds under (4711, 3)); held by the one process running a pass.
LOCK_CLASS, LOCK_ID = 4711, 5
# A day's drop that cannot lock both parents this soon is tried at the next pass: a
# lock request queued behind a long reader would stall every writer of jobs meanwhile.
DROP_LOCK_TIMEOUT_MS = 2000

# Constants of this module, inlined: text() binds no tuple without an expanding param.
_TERMINAL = ", ".join(f"'{s}'" for s in sorted(str(s) for s in TERMINAL_STATES))

# A job that retention may delete. ``enqueued_at < :cutoff`` is implied by the finish
# time (a job is pushed before it finishes) and lets the planner range-scan
# ix_jobs_state_enqueued instead of reading every finished job; rows whose enqueued_at
# is later than their finish (stamped by a migration) are only kept a little longer.
# ``{outside}``: not in a day partition that drops take (``_outside``).
_ELIGIBLE = f"""
    {{outside}} AND j.state IN ({_TERMINAL})
    AND j.finished_at < :cutoff
    AND j.enqueued_at < :cutoff
    AND NOT EXISTS (
        SELECT 1 FROM slides s
        WHERE s.id = j.batch_id AND (s.finished_at IS NULL OR s.finished_at >= :cutoff)
    )
"""

_TAKE = f"SELECT j.id FROM jobs j WHERE {_ELIGIBLE} LIMIT :n FOR UPDATE OF j SKIP LOCKED"
_DELETE_EVENTS = text("DELETE FROM job_events WHERE job_id = ANY(:ids)")
_DELETE_JOBS = text("DELETE FROM jobs WHERE id = ANY(:ids) RETURNING batch_id, kind, object_key")
_EMPTY = "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = {t}.id)"
_DELETE_SLIDES = text(
    "DELETE FROM slides s WHERE s.id = ANY(:batches) AND "
    + _EMPTY.format(t="s")
    + " RETURNING s.object_key, s.thumbnail_key, s.mask_key"
)
_DELETE_BATCHES = text(
    "DELETE FROM batches b WHERE b.id = ANY(:batches) AND " + _EMPTY.format(t="b")
)
_DELETE_KEYS = text(
    "DELETE FROM idempotency_keys WHERE (tenant, key) IN ("
    " SELECT tenant, key FROM idempotency_keys WHERE expires_at <= now()"
    " LIMIT :n FOR UPDATE SKIP LOCKED)"
)
# Delivered, or failed for good: nothing will read them again.
_SETTLED = "state IN ('delivered', 'failed') AND created_at < :cutoff"
_DELETE_DELIVERIES = text(
    "DELETE FROM webhook_deliveries WHERE id IN ("
    f" SELECT id FROM webhook_deliveries WHERE {_SETTLED} LIMIT :n FOR UPDATE SKIP LOCKED)"
)

# What a dry run reports: the same predicates, counted, nothing locked or deleted.
_COUNT_JOBS = (
    f"SELECT count(*), count(*) FILTER (WHERE j.kind = 'image') FROM jobs j WHERE {_ELIGIBLE}"
)
_COUNT_EVENTS = (
    f"SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE {_ELIGIBLE}"
)
# Batches every job of which would go (a slide among them brings its three objects).
_COUNT_BATCHES = (
    "SELECT count(*), count(s.id), count(s.thumbnail_key) + count(s.mask_key) FROM batches b"
    " LEFT JOIN slides s ON s.id = b.id"
    f" WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id AND {_ELIGIBLE})"
    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id"
    f" AND NOT coalesce(({_ELIGIBLE}), false))"
)
_COUNT_KEYS = text("SELECT count(*) FROM idempotency_keys WHERE expires_at <= now()")
_COUNT_DELIVERIES = text(f"SELECT count(*) FROM webhook_deliveries WHERE {_SETTLED}")


@dataclass
class Retained:
    """What a pass deleted (or, in a dry run, would delete)."""

    jobs: int = 0
    events: int = 0
    batches: int = 0  # slides included: a slide is a batch too
    slides: int = 0
    idempotency_keys: int = 0
    webhook_deliveries: int = 0
    objects: int = 0  # deleted from the store (a dry run: that would be)
    objects_failed: int = 0  # left behind as orphans (logged)
    days: int = 0  # day partitions dropped (their jobs and events are counted above)
    transactions: int = 0  # job chunks and day drops committed
    ran: bool = True  # False: another process held the pass's lock; nothing was done
    more: bool = False  # stopped at max_chunks with eligible jobs possibly left

    def counts(self) -> dict[str, int]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if not isinstance(v, bool)}


def run(
    engine: Engine,
    store: ObjectStore,
    older_than_days: float,
    *,
    chunk: int = 1000,
    dry_run: bool = False,
    max_chunks: int | None = None,
    stop: threading.Event | None = None,
) -> Retained:
    """One retention pass: delete what finished more than ``older_than_days`` ago, in
    transactions of at most ``chunk`` jobs, at most ``max_chunks`` of them (None: until
    none is left), stopping early when ``stop`` is set. Returns ``ran=False`` at once
    when another pass holds the lock."""
    if older_than_days <= 0:
        raise ValueError("older_than_days must be positive (0 would mean keep forever)")
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    with engine.connect() as lock_conn:
        held = lock_conn.execute(
            text("SELECT pg_try_advisory_lock(:c, :i)"), {"c": LOCK_CLASS, "i": LOCK_ID}
        ).scalar_one()
        # The lock is the session's and outlives this commit; no transaction stays open
        # (an open snapshot would hold back vacuum of the very rows deleted).
        lock_conn.commit()
        if not held:
            return Retained(ran=False)
        try:
            cutoff = lock_conn.execute(
                text("SELECT now() - make_interval(secs => :s)"),
                {"s": older_than_days * 86_400.0},
            ).scalar_one()
            lock_conn.commit()
            if dry_run:
                return _count(engine, cutoff)
            return _delete(engine, store, cutoff, chunk, max_chunks, stop)
        finally:
            try:
                lock_conn.execute(
                    text("SELECT pg_advisory_unlock(:c, :i)"), {"c": LOCK_CLASS, "i": LOCK_ID}
                )
                lock_conn.commit()
            except Exception:
                # A pooled connection must never keep the lock (every later pass would
                # skip): closed instead, which ends its session and the lock with it.
                lock_conn.invalidate()
                raise


def _delete(
    engine: Engine,
    store: ObjectStore,
    cutoff: datetime,
    chunk: int,
    max_chunks: int | None,
    stop: threading.Event | None,
) -> Retained:
    out = Retained()
    _drop_days(engine, store, cutoff, max_chunks, stop, out)
    with engine.connect() as conn:
        take = _outside(_TAKE, retention_days.skipped_ranges(conn, cutoff))
    while max_chunks is None or out.transactions < max_chunks:
        if stop is not None and stop.is_set():
            out.more = True
            break
        with engine.begin() as conn:
            keys = _delete_chunk(conn, take, cutoff, chunk, out)
        if keys is None:
            break
        out.transactions += 1
        _remove(store, keys, out)
    else:
        out.more = True
    # Not tied to jobs: each in its own bounded transactions.
    out.idempotency_keys = _drain(engine, _DELETE_KEYS, {}, chunk)
    out.webhook_deliveries = _drain(engine, _DELETE_DELIVERIES, {"cutoff": cutoff}, chunk)
    return out


def _outside(sql: str, skipped: list[tuple[str, str]]) -> Any:
    """``sql`` (a statement of ``_ELIGIBLE``) for jobs outside the ``skipped`` id ranges."""
    statement, params = outside_sql(sql, skipped)
    return text(statement).bindparams(**params)


def outside_sql(sql: str, skipped: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """``sql`` with its ``{outside}`` condition, and that condition's values: a condition
    per range, which the planner prunes those days' partitions by."""
    params: dict[str, str] = {}
    conditions = []
    for i, (lo, hi) in enumerate(skipped):
        conditions.append(
            f"(j.id < CAST(:skip_lo{i} AS uuid) OR j.id >= CAST(:skip_hi{i} AS uuid))"
        )
        params |= {f"skip_lo{i}": lo, f"skip_hi{i}": hi}
    outside = "(" + " AND ".join(conditions) + ")" if conditions else "true"
    return sql.format(outside=outside), params


def _drop_days(
    engine: Engine,
    store: ObjectStore,
    cutoff: datetime,
    max_chunks: int | None,
    stop: threading.Event | None,
    out: Retained,
) -> None:
    """Drop the due days that may go whole (common.retention_days), oldest first, a
    transaction each; then their emptied batches, and their objects."""
    with engine.connect() as conn:
        due = retention_days.due_days(conn, cutoff)
    for day in due:
        if (stop is not None and stop.is_set()) or (
            max_chunks is not None and out.transactions >= max_chunks
        ):
            out.more = True
            return
        with engine.connect() as conn:
            if retention_days.has_unfinished(conn, day) or retention_days.waits(conn, day, cutoff):
                continue
            found = retention_days.survey(conn, day, cutoff)
        if found is None:
            continue
        try:
            with engine.begin() as conn:
                dropped = retention_days.drop(conn, found, DROP_LOCK_TIMEOUT_MS)
        except OperationalError as error:
            if getattr(error.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            log.info("retention: %s not dropped, jobs was busy; the next pass tries", day)
            out.more = True
            continue
        if not dropped:
            continue
        out.transactions += 1
        out.days += 1
        out.jobs += found.jobs
        out.events += found.events
        keys = list(found.keys)
        batches = sorted(found.batches)
        for start in range(0, len(batches), 1000):
            with engine.begin() as conn:
                keys += _delete_emptied(conn, set(batches[start : start + 1000]), out)
        _remove(store, keys, out)


def _delete_chunk(
    conn: Connection, take: Any, cutoff: datetime, chunk: int, out: Retained
) -> list[str] | None:
    """Delete one chunk's rows; the keys of the objects they named (None: no job left)."""
    ids = list(conn.execute(take, {"cutoff": cutoff, "n": chunk}).scalars())
    if not ids:
        return None
    out.events += conn.execute(_DELETE_EVENTS, {"ids": ids}).rowcount
    keys: list[str] = []
    batches: set[uuid.UUID] = set()
    for batch_id, kind, object_key in conn.execute(_DELETE_JOBS, {"ids": ids}):
        out.jobs += 1
        if batch_id is not None:
            batches.add(batch_id)
        # A plan's or tile's object is its slide's: it goes with the slide's row.
        if kind == "image":
            keys.append(object_key)
    return keys + _delete_emptied(conn, batches, out)


def _delete_emptied(conn: Connection, batches: set[uuid.UUID], out: Retained) -> list[str]:
    """Delete those of ``batches`` left without a job, and their slides; the slides'
    objects' keys."""
    if not batches:
        return []
    keys: list[str] = []
    touched = {"batches": list(batches)}
    for row in conn.execute(_DELETE_SLIDES, touched):
        out.slides += 1
        keys.extend(k for k in row if k)
    out.batches += conn.execute(_DELETE_BATCHES, touched).rowcount
    return keys


def _remove(store: ObjectStore, keys: list[str], out: Retained) -> None:
    """Delete ``keys`` from the store (after their rows' commit). A key already gone
    counts as deleted (S3's DeleteObjects); one that fails is logged and left."""
    if not keys:
        return
    failed = 0
    try:
        for error in store.client.remove_objects(store.bucket, (DeleteObject(k) for k in keys)):
            failed += 1
            log.warning("retention: could not delete %s: %s", error.name, error.message)
    except Exception:
        log.warning("retention: could not delete %d objects", len(keys), exc_info=True)
        failed = len(keys)
    out.objects += len(keys) - failed
    out.objects_failed += failed


def _drain(engine: Engine, statement: Any, params: dict[str, Any], chunk: int) -> int:
    total = 0
    while True:
        with engine.begin() as conn:
            n = conn.execute(statement, {**params, "n": chunk}).rowcount
        total += n
        if n < chunk:
            return total


def _count(engine: Engine, cutoff: datetime) -> Retained:
    p = {"cutoff": cutoff}
    with engine.connect() as conn:
        # A day that a pass would drop has only jobs that may go: counted as the chunks'.
        days = frozenset(
            d
            for d in retention_days.due_days(conn, cutoff)
            if not retention_days.has_unfinished(conn, d)
            and not retention_days.waits(conn, d, cutoff)
            and retention_days.survey(conn, d, cutoff) is not None
        )
        skipped = retention_days.skipped_ranges(conn, cutoff, days)
        jobs, images = conn.execute(_outside(_COUNT_JOBS, skipped), p).one()
        batches, slides, slide_images = conn.execute(_outside(_COUNT_BATCHES, skipped), p).one()
        return Retained(
            jobs=jobs,
            events=conn.execute(_outside(_COUNT_EVENTS, skipped), p).scalar_one(),
            days=len(days),
            batches=batches,
            slides=slides,
            idempotency_keys=conn.execute(_COUNT_KEYS).scalar_one(),
            webhook_deliveries=conn.execute(_COUNT_DELIVERIES, p).scalar_one(),
            objects=images + slides + slide_images,
        )
