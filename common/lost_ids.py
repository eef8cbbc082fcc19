"""Pending jobs whose ids Redis no longer holds, found without guessing from age, and
pushed again. Postgres is the truth and Redis only the dispatch channel, so an id can go
missing in two ways, each found its own way:

- **Redis lost its data**: a restart without persistence, a ``FLUSHALL``, a restore from
  an older snapshot. ``DISPATCH_MARKER_KEY`` holds the run_id of the Redis whose queues
  were last compared with the pending jobs; when it is gone (flushed) or names another
  run_id (restarted), one sweeper, under a lock, compares every queue with the pending
  rows and pushes what is missing, then sets the marker again. Every pending job is back
  within one sweep interval of the fault.
- **One id was dropped while Redis kept the rest**: a worker died between its pop and its
  claim, or a gateway or worker could not push after its commit. Once per
  ``requeue_pending_after_s`` (one sweeper in the whole cluster, by a key with that TTL)
  the pending jobs older than that are compared with their queues and the retry set; an
  id missing at two such scans in a row is lost and pushed again. Two, because a live
  worker holds the ids it popped for a moment before its claim; a period later it has
  claimed them, and they are no longer pending. (LPOS per id would cost a pass over the
  list for each id; one LRANGE of each list per period costs one pass in all.)

With no fault, an id that is still on its queue is never pushed again however long it
waits: a backlog, or the queue of a model no worker serves, costs one read of its lists
per period and not one push. Right after a fault, an id a worker had popped but not yet
claimed may be pushed twice; the claim drops the second copy."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import redis
from sqlalchemy import Engine, func, select

from hepato.common import dispatch
from hepato.common.constants import (
    DELAYED_KEY,
    DISPATCH_MARKER_KEY,
    DISPATCH_REPAIR_KEY,
    DISPATCH_SCAN_KEY,
    DISPATCH_SUSPECTS_KEY,
    JobState,
    queue_key,
)
from hepato.common.jobs import Requeue
from hepato.common.tables import Job

log = logging.getLogger(__name__)

# Longer than a repair of a few hundred thousand jobs takes; a sweeper that dies holding
# the lock delays the next repair by at most this.
REPAIR_LOCK_S = 300
PUSH_CHUNK = 10_000

# The marker is set only if this repair's lock is still there: a flush or restart during
# the repair took the lock with it, and the next sweep repairs again.
_FINISH_REPAIR = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('set', KEYS[2], ARGV[2])
    redis.call('del', KEYS[1], KEYS[3])
    return 1
end
return 0
"""


@dataclass(frozen=True)
class Found:
    repaired: bool  # Redis had lost its data: every queue compared with every pending job
    scanned: bool  # this sweeper's turn to look for single lost ids
    pushed: int  # ids pushed again


def recover(engine: Engine, client: redis.Redis, period_s: float) -> Found:
    """Push again the pending jobs whose ids Redis lost (see the module's docstring)."""
    run_id = str(client.info("server")["run_id"])
    marker = client.get(DISPATCH_MARKER_KEY)
    if marker is None or _text(marker) != run_id:
        pushed = _repair(engine, client, run_id)
        return Found(pushed is not None, False, pushed or 0)
    if not client.set(DISPATCH_SCAN_KEY, run_id, nx=True, px=max(int(period_s * 1000), 1)):
        return Found(False, False, 0)
    return Found(False, True, _scan(engine, client, period_s))


def _repair(engine: Engine, client: redis.Redis, run_id: str) -> int | None:
    """Compare every queue with every pending job and push what is missing; None when
    another sweeper holds the repair."""
    token = uuid.uuid4().hex
    if not client.set(DISPATCH_REPAIR_KEY, token, nx=True, ex=REPAIR_LOCK_S):
        return None
    pending = _pending(engine)
    held = _held(client, pending)
    missing = [job for job in pending if str(job.id) not in held]
    _push(client, missing)
    keys = (DISPATCH_REPAIR_KEY, DISPATCH_MARKER_KEY, DISPATCH_SUSPECTS_KEY)
    finished = client.eval(_FINISH_REPAIR, len(keys), *keys, token, run_id)
    if missing:
        log.warning(
            "%d of %d pending jobs were missing from Redis (a restart or flush, or the first "
            "sweep on this Redis): pushed again%s",
            len(missing),
            len(pending),
            "" if finished else "; Redis lost data again meanwhile, the next sweep repairs",
        )
    else:
        log.info("Redis holds every one of the %d pending jobs", len(pending))
    return len(missing)


def _scan(engine: Engine, client: redis.Redis, period_s: float) -> int:
    """Push the stale pending jobs missing from their queues now and at the last scan."""
    stale = _pending(engine, older_than_s=period_s)
    held = _held(client, stale)
    missing = {str(job.id): job for job in stale if str(job.id) not in held}
    before = {_text(raw) for raw in client.smembers(DISPATCH_SUSPECTS_KEY)}
    suspects = [job_id for job_id in missing if job_id not in before]
    pipe = client.pipeline(transaction=True)
    pipe.delete(DISPATCH_SUSPECTS_KEY)
    if suspects:
        pipe.sadd(DISPATCH_SUSPECTS_KEY, *suspects)
    pipe.execute()
    # Read again: one claimed since the first read is no longer lost.
    lost = _still_pending(engine, [missing[job_id].id for job_id in missing if job_id in before])
    if lost:
        _push(client, lost)
        log.warning("%d pending jobs were missing from their queues; pushed again", len(lost))
    return len(lost)


def _pending(engine: Engine, older_than_s: float | None = None) -> list[Requeue]:
    """Pending jobs, oldest first; only those pushed over ``older_than_s`` ago if given."""
    query = select(Job.id, Job.model, Job.priority, Job.tenant).where(Job.state == JobState.pending)
    if older_than_s is not None:
        query = query.where(Job.enqueued_at < func.now() - timedelta(seconds=older_than_s))
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(Job.created_at)).all()
    return [Requeue(*row) for row in rows]


def _still_pending(engine: Engine, ids: Sequence[uuid.UUID]) -> list[Requeue]:
    if not ids:
        return []
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.model, Job.priority, Job.tenant)
            .where(Job.id.in_(ids), Job.state == JobState.pending)
            .order_by(Job.created_at)
        ).all()
    return [Requeue(*row) for row in rows]


def _held(client: redis.Redis, jobs: Iterable[Requeue]) -> set[str]:
    """The ids on the queues of ``jobs`` or waiting out a retry's backoff, read in one
    MULTI so that no id moves between lists while they are read."""
    keys = sorted({queue_key(job.model, job.priority, job.tenant) for job in jobs})
    if not keys:
        return set()
    pipe = client.pipeline(transaction=True)
    for key in keys:
        pipe.lrange(key, 0, -1)
    pipe.zrange(DELAYED_KEY, 0, -1)
    *lists, delayed = pipe.execute()
    held = {_text(raw) for ids in lists for raw in ids}
    # A delayed entry is "<queue key> <job id>".
    held.update(_text(raw).rpartition(" ")[2] for raw in delayed)
    return held


def _push(client: redis.Redis, jobs: Sequence[Requeue]) -> None:
    # Straight onto their queues: a job whose retry is still in its backoff goes back to
    # wait when a worker pops it (common.claim).
    now = [replace(job, delay_s=0.0) for job in jobs]
    for start in range(0, len(now), PUSH_CHUNK):
        dispatch.requeue(client, now[start : start + PUSH_CHUNK])


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
