"""Dispatch through Redis: push job ids onto a model's queue (the gateway on submit, the
worker when it requeues) and read a model's queue depth. Forming microbatches from these
queues is the worker's alone (worker.microbatch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from hepato.common.constants import Priority, queue_key, queue_keys


def push(client: redis.Redis, model: str, priority: Priority | str, ids: Iterable[str]) -> None:
    ids = list(ids)
    if ids:
        client.rpush(queue_key(model, priority), *ids)


def push_front(
    client: redis.Redis, model: str, priority: Priority | str, ids: Sequence[str]
) -> None:
    """Put ``ids`` at the head of their queue, in their order: they are taken next."""
    if ids:
        client.lpush(queue_key(model, priority), *reversed(ids))


def depth(client: redis.Redis, model: str) -> int:
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(model):
        pipe.llen(key)
    return int(sum(pipe.execute()))
