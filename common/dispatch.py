"""Dispatch through Redis: push job ids, and collect them into microbatches."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import redis

from hepato.common.constants import Priority, queue_key, queue_keys


def push(client: redis.Redis, model: str, priority: Priority | str, ids: Iterable[str]) -> None:
    ids = list(ids)
    if ids:
        client.rpush(queue_key(model, priority), *ids)


def depth(client: redis.Redis, model: str) -> int:
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(model):
        pipe.llen(key)
    return int(sum(pipe.execute()))


@dataclass(frozen=True)
class ModelQueue:
    """One model's queues and how its microbatches are formed."""

    model: str
    max_batch: int
    max_wait_s: float

    @property
    def keys(self) -> list[str]:
        return queue_keys(self.model)


def collect_batch(
    client: redis.Redis,
    keys: Sequence[str],
    max_batch: int,
    max_wait_s: float,
    poll_timeout_s: float,
) -> list[str]:
    """Block up to ``poll_timeout_s`` for a first id, then fill up to ``max_batch``,
    waiting at most ``max_wait_s`` after the first for stragglers. Keys are read in
    order, so earlier keys (urgent) always go first. Returns [] if nothing came."""
    first = client.blpop(list(keys), timeout=poll_timeout_s)
    if first is None:
        return []
    return _fill(client, keys, [_text(first[1])], max_batch, max_wait_s)


def collect_any(
    client: redis.Redis, queues: Sequence[ModelQueue], poll_timeout_s: float
) -> tuple[ModelQueue, list[str]] | None:
    """A microbatch of one model, from whichever of ``queues`` has work: every model's
    urgent queue before any routine one, and among equals the first in ``queues``. The
    caller rotates ``queues`` between calls so that no model starves another."""
    by_key = {key: q for q in queues for key in q.keys}
    urgent = [q.keys[0] for q in queues]
    routine = [q.keys[1] for q in queues]
    first = client.blpop([*urgent, *routine], timeout=poll_timeout_s)
    if first is None:
        return None
    key, value = first
    owner = by_key[_text(key)]
    return owner, _fill(client, owner.keys, [_text(value)], owner.max_batch, owner.max_wait_s)


def _fill(
    client: redis.Redis, keys: Sequence[str], batch: list[str], max_batch: int, max_wait_s: float
) -> list[str]:
    deadline = time.monotonic() + max_wait_s
    while True:
        for key in keys:
            need = max_batch - len(batch)
            if need <= 0:
                break
            # LPOP with a count needs Redis >= 6.2.
            got = cast(list[bytes] | None, client.lpop(key, need))
            if got:
                batch.extend(_text(x) for x in got)
        remaining = deadline - time.monotonic()
        if len(batch) >= max_batch or remaining <= 0:
            return batch
        # Sleep in Redis rather than spin: BLPOP wakes the moment a straggler arrives.
        # (A timeout of 0 would block forever, hence the floor.)
        nxt = client.blpop(list(keys), timeout=max(remaining, 0.001))
        if nxt is None:
            return batch
        batch.append(_text(cast(tuple[bytes, bytes], nxt)[1]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
