"""Dispatch through Redis: push job ids onto their queue (the gateway on submit, the
worker when it requeues) and read a model's queue depth. Each model has an urgent and a
routine list per tenant, and a set naming the tenants with lists; forming microbatches
from them, taking turns between models and tenants, is the worker's (worker.microbatch)."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import cast

import redis

from hepato.common import wake_publish
from hepato.common.constants import (
    DELAYED_KEY,
    HINT_TTL_MS,
    PUBLIC_TENANT,
    TAKEN_TTL_MS,
    TAKER_TTL_MS,
    Priority,
    hint_key,
    inline_key,
    queue_key,
    queue_keys,
    taker_key,
    tenants_key,
)
from hepato.common.jobs import Requeue

# A hinted job's id goes to the list its hint's taker named, if one did (worker.head_start),
# else to its queue. The taker's list is a key the script reads from another key, which
# Redis Cluster would refuse; this project's Redis is one server. Atomic: a stopping
# worker that deletes its taker keys, then empties its lists, misses no id.
_ROUTE = """
local dest = redis.call('get', KEYS[1])
if dest then
    redis.call('del', KEYS[1])
    redis.call('rpush', dest, ARGV[1])
    redis.call('pexpire', dest, ARGV[2])
else
    redis.call('rpush', KEYS[2], ARGV[1])
end
"""


def push(
    client: redis.Redis,
    model: str,
    priority: Priority | str,
    ids: Iterable[str],
    tenant: str = PUBLIC_TENANT,
    *,
    inline: Mapping[str, bytes] | None = None,
    inline_ttl_s: float = 120.0,
    wakes: Collection[str] = (),
    hinted: bool = False,
) -> None:
    """Queue ``ids``, in one round trip with the ``inline`` images (by id), which are set
    before the ids are pushed: a worker that pops an id finds its bytes already there;
    and with the ``wakes`` of their commit (common.wake_publish). The id of a ``hinted``
    job (``hint``) goes to the worker that took its hint, where one did."""
    ids = list(ids)
    if ids:
        pipe = client.pipeline(transaction=False)
        for job_id, data in (inline or {}).items():
            pipe.set(inline_key(job_id), data, px=int(inline_ttl_s * 1000))
        pipe.sadd(tenants_key(model), tenant)
        queue = queue_key(model, priority, tenant)
        if hinted and len(ids) == 1:
            # EVAL, not a registered script: a pipeline with one sends SCRIPT EXISTS first.
            pipe.eval(_ROUTE, 2, taker_key(ids[0]), queue, ids[0], TAKEN_TTL_MS)
        else:
            pipe.rpush(queue, *ids)
        wake_publish.add_to(pipe, wakes)
        pipe.execute()


def hint(client: redis.Redis, model: str, job_id: str, data: bytes, inline_ttl_s: float) -> None:
    """Announce a lone job before it commits: its image inline, and its id as the model's
    one hint (a newer one replaces it), in one round trip. Not a dispatch: the job is
    pushed once committed (``push`` with ``hinted``: to the worker that took the hint,
    if one did); an idle worker may start on it sooner (worker.head_start), and one that
    is refused never gets written."""
    key = hint_key(model)
    pipe = client.pipeline(transaction=False)
    pipe.set(inline_key(job_id), data, px=int(inline_ttl_s * 1000))
    pipe.delete(key)
    pipe.rpush(key, job_id)
    pipe.pexpire(key, HINT_TTL_MS)
    pipe.execute()


def pass_on(client: redis.Redis, hint: str, job_id: str) -> None:
    """Put back a hint a busy worker popped (``hint``: its key), for an idle one blocked on
    it, which Redis hands it to at once; kept ``HINT_TTL_MS`` again."""
    pipe = client.pipeline(transaction=False)
    pipe.rpush(hint, job_id)
    pipe.pexpire(hint, HINT_TTL_MS)
    pipe.execute()


def take_hinted(client: redis.Redis, job_id: str, taker: str) -> bytes | None:
    """For the worker that takes a hint: name its list ``taker`` for the job's push (first,
    so that it is set before the push reads it) and take the job's inline image, in one
    round trip; None if the image is gone (its job already taken)."""
    pipe = client.pipeline(transaction=False)
    pipe.set(taker_key(job_id), taker, px=TAKER_TTL_MS)
    pipe.getdel(inline_key(job_id))
    return cast(bytes | None, pipe.execute()[1])


def untake(client: redis.Redis, job_ids: Iterable[str], lists: Sequence[str]) -> list[str]:
    """For a stopping worker, in one transaction: remove the taker keys of ``job_ids`` (so
    that no push routes an id to it after: ``_ROUTE`` reads and pushes in one step), then
    take every id already on its ``lists``."""
    job_ids = list(job_ids)
    pipe = client.pipeline(transaction=True)
    for job_id in job_ids:
        pipe.delete(taker_key(job_id))
    for key in lists:
        pipe.lrange(key, 0, -1)
    pipe.delete(*lists)
    found = pipe.execute()[len(job_ids) : -1]
    return [raw.decode() for ids in found for raw in ids]


def take_inline(client: redis.Redis, ids: Sequence[str]) -> dict[str, bytes]:
    """The inline images of ``ids`` that are still in Redis, removed as they are read (a
    retry downloads from the object store), in one round trip."""
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.getdel(inline_key(job_id))
    return {job_id: data for job_id, data in zip(ids, pipe.execute(), strict=True) if data}


def requeue(client: redis.Redis, jobs: Sequence[Requeue], *, front: bool = False) -> None:
    """Put jobs made pending again back on their queues, in one round trip: at the tail,
    or at the head with ``front``; one still inside its backoff waits in the delayed set
    until it is due (``release_due``)."""
    if not jobs:
        return
    now = time.time()
    pipe = client.pipeline(transaction=False)
    by_queue: dict[str, list[str]] = {}
    # One SADD per model and tenant: a slide's plan requeues its 100,000 tiles at once.
    for model, tenant in {(job.model, job.tenant) for job in jobs}:
        pipe.sadd(tenants_key(model), tenant)
    for job in jobs:
        key = queue_key(job.model, job.priority, job.tenant)
        if job.delay_s > 0:
            pipe.zadd(DELAYED_KEY, {f"{key} {job.id}": now + job.delay_s})
        else:
            by_queue.setdefault(key, []).append(str(job.id))
    for key, ids in by_queue.items():
        if front:
            pipe.lpush(key, *reversed(ids))
        else:
            pipe.rpush(key, *ids)
    pipe.execute()


def release_due(client: redis.Redis, limit: int = 1000) -> int:
    """Move retries whose backoff has passed onto their queues. Many workers may run
    this at once: only the one whose ZREM removed an entry pushes it. An entry removed
    by a worker that dies before its push is still pending in Postgres, where the
    sweeper finds it."""
    due = cast(
        list[bytes], client.zrangebyscore(DELAYED_KEY, "-inf", time.time(), start=0, num=limit)
    )
    if not due:
        return 0
    pipe = client.pipeline(transaction=False)
    for member in due:
        pipe.zrem(DELAYED_KEY, member)
    removed = [m for m, gone in zip(due, pipe.execute(), strict=True) if gone]
    for member in removed:
        key, _, job_id = member.decode().rpartition(" ")
        pipe.rpush(key, job_id)
    if removed:
        pipe.execute()
    return len(removed)


def tenants(client: redis.Redis, model: str) -> list[str]:
    """The tenants whose lists of ``model`` may hold ids, the open mode's always among
    them; sorted, so that every worker takes turns in the same order."""
    names = {raw.decode() for raw in cast(set[bytes], client.smembers(tenants_key(model)))}
    return sorted(names | {PUBLIC_TENANT})


def depth(client: redis.Redis, model: str, priority: Priority | str | None = None) -> int:
    """Ids queued for ``model`` (of one priority, or both), over every tenant's lists."""
    pipe = client.pipeline(transaction=False)
    for tenant in tenants(client, model):
        keys = queue_keys(model, tenant)
        for key in keys if priority is None else [queue_key(model, priority, tenant)]:
            pipe.llen(key)
    return int(sum(pipe.execute()))
