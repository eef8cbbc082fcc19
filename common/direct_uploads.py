"""Direct uploads: where a client's own PUT of an image lands, how long it may wait to be
committed, and the sweep that deletes what was put but never committed.

A staged object's key is ``direct/{YYYYMMDDHH}/{tenant}/{job id hex}``: the UTC hour it
was signed in, its tenant, and the id its job will have once committed. The gateway
(gateway.direct) signs a PUT URL for it, valid ``upload_url_expiry_s``; the commit makes
the job with that very id and the object stays where it is (no copy: the store does no
second write per image). So the key says by itself whether it was committed (a job row
with that id exists, a primary-key lookup), a key can be committed once at most (a second
insert of the id fails), and the staged objects of one hour are listed by one prefix.

The commit window of an hour's keys ends ``commit_by``: the hour's end plus twice the URL
lifetime (one lifetime for the PUT to start, one more for the upload and the commit); the
gateway refuses a later commit. ``SWEEP_MARGIN_S`` after that, an hour is swept: each key
no job names is deleted (never put, refused at commit, or abandoned), the others stay
until retention deletes them with their jobs. Swept hours are behind a watermark kept as a
small object in the store itself (``WATERMARK_KEY``), so a pass lists only the hours after
it; should it be lost, the next pass starts over from the first hour, at the cost of
checking committed keys again, never of deleting one."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import Engine, select

from hepato.common.exceptions import ObjectMissing
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job

log = logging.getLogger(__name__)

PREFIX = "direct/"
HOUR_FORMAT = "%Y%m%d%H"
_KEY = re.compile(r"direct/(\d{10})/([a-z][a-z0-9._-]{0,63})/([0-9a-f]{32})")
# A commit that passed its window check is written well within this; it also absorbs
# clock skew between the gateway that checks and the worker that sweeps.
SWEEP_MARGIN_S = 600.0
WATERMARK_KEY = "sweeps/direct-uploads"
# Keys checked against Postgres per query, and deleted per request.
CHUNK = 1000
# One sweeper of the fleet at a time (others find the lock taken), and each worker tries
# at most this often: a pass is one small GET and one listing when nothing is due.
LOCK_KEY = "hepato:direct-uploads:sweep"
LOCK_TTL_S = 300
EVERY_S = 60.0
# Hours one pass sweeps at most: a backlog goes down a few hours a pass, and the pass
# (on the worker's sweeper thread) never holds its heartbeat up for long.
HOURS_PER_PASS = 4


@dataclass(frozen=True)
class StagedKey:
    key: str
    hour: datetime  # the start of the UTC hour the key was signed in
    tenant: str
    job_id: uuid.UUID

    def commit_by(self, expiry_s: float) -> datetime:
        """The end of this key's commit window."""
        return self.hour + timedelta(hours=1) + timedelta(seconds=2 * expiry_s)


def new_key(tenant: str, job_id: uuid.UUID, now: datetime | None = None) -> StagedKey:
    """A key for an upload signed now (server-generated: client names never reach it)."""
    hour = (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    key = f"{PREFIX}{hour.strftime(HOUR_FORMAT)}/{tenant}/{job_id.hex}"
    return StagedKey(key, hour, tenant, job_id)


def parse_key(key: str) -> StagedKey | None:
    """The key's parts, or None for anything that is not a direct upload's key."""
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    try:
        hour = datetime.strptime(match[1], HOUR_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
    return StagedKey(key, hour, match[2], uuid.UUID(hex=match[3]))


def sweepable_until(now: datetime, expiry_s: float) -> datetime:
    """Hours that start before this are swept: their commit window closed at least
    SWEEP_MARGIN_S ago."""
    return now - timedelta(hours=1, seconds=2 * expiry_s + SWEEP_MARGIN_S)


@dataclass
class Swept:
    hours: int = 0
    deleted: int = 0
    kept: int = 0  # committed: their jobs name them


def sweep(
    engine: Engine,
    store: ObjectStore,
    expiry_s: float,
    *,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    max_hours: int | None = None,
) -> Swept:
    """Delete the staged objects of every hour due (``sweepable_until``) that no job
    names; advance the watermark past each hour done. Safe to run in many processes at
    once (a key is deleted only once its window has closed and no job has its id).
    ``max_hours``: at most that many hours this pass (the rest wait for the next)."""
    until = sweepable_until(now or datetime.now(UTC), expiry_s)
    done = Swept()
    for hour in _hours_after(store, _watermark(store)):
        if hour >= until or (stop is not None and stop.is_set()) or done.hours == max_hours:
            break
        deleted, kept = _sweep_hour(engine, store, hour)
        done.hours += 1
        done.deleted += deleted
        done.kept += kept
        store.put(WATERMARK_KEY, hour.strftime(HOUR_FORMAT).encode(), "text/plain")
    return done


def _watermark(store: ObjectStore) -> str | None:
    try:
        return store.get(WATERMARK_KEY).decode().strip() or None
    except ObjectMissing:  # the first pass, or lost: start from the first hour
        return None


def _hours_after(store: ObjectStore, watermark: str | None) -> Iterator[datetime]:
    """The staged hours after the watermark, oldest first (S3 lists in key order)."""
    after = f"{PREFIX}{watermark}/" if watermark else None
    for item in store.client.list_objects(store.bucket, prefix=PREFIX, start_after=after):
        name = item.object_name or ""
        if not item.is_dir:
            continue
        try:
            yield datetime.strptime(name[len(PREFIX) : -1], HOUR_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            log.warning("direct uploads: %r is not an hour of staged keys; skipped", name)


def _sweep_hour(engine: Engine, store: ObjectStore, hour: datetime) -> tuple[int, int]:
    prefix = f"{PREFIX}{hour.strftime(HOUR_FORMAT)}/"
    keys = (
        item.object_name
        for item in store.client.list_objects(store.bucket, prefix=prefix, recursive=True)
        if item.object_name
    )
    deleted = kept = 0
    for chunk in _chunks(keys, CHUNK):
        staged = {key: parse_key(key) for key in chunk}
        ids = [s.job_id for s in staged.values() if s is not None]
        committed = _existing(engine, ids)
        # A key of no known shape under the prefix was not signed here: left alone.
        garbage = [k for k, s in staged.items() if s is not None and s.job_id not in committed]
        if garbage:
            store.remove(garbage)
        deleted += len(garbage)
        kept += len(ids) - len(garbage)
    if deleted:
        log.info("direct uploads: %d never committed in hour %s, deleted", deleted, prefix)
    return deleted, kept


def _existing(engine: Engine, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not ids:
        return set()
    with engine.connect() as conn:
        return set(conn.execute(select(Job.id).where(Job.id.in_(ids))).scalars())


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Sweeper:
    """The worker's hook (worker.recovery): a pass at most every EVERY_S per process,
    and by one process of the fleet at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: ObjectStore | None = None
        self._next = 0.0

    def maybe_run(self, engine: Engine, client: redis.Redis, stop: threading.Event) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + EVERY_S
        try:
            if not client.set(LOCK_KEY, "1", nx=True, ex=LOCK_TTL_S):
                return
        except redis.RedisError:
            return  # correctness does not need the lock; the next pass tries again
        try:
            if self._store is None:
                self._store = ObjectStore(self.settings, pool_size=4)
            expiry = self.settings.upload_url_expiry_s
            done = sweep(engine, self._store, expiry, stop=stop, max_hours=HOURS_PER_PASS)
        finally:
            with contextlib.suppress(redis.RedisError):
                client.delete(LOCK_KEY)
        if done.hours:
            log.info("direct uploads: %d hours swept, %d deleted", done.hours, done.deleted)
