"""Redis wake-ups after a job event's commit: a hint to re-read Postgres sooner.

Every waiter in the gateway (the SSE streams, ``/v1/predict``) reads the truth from
Postgres and only sleeps on this; common.event_log publishes after each commit that
recorded events. Redis being down or dropping the subscription degrades to the waiter's
interval re-read."""

from __future__ import annotations

import contextlib
import logging
import time

import anyio
import redis
import redis.asyncio

log = logging.getLogger(__name__)


class Wakeups:
    """A Redis subscription to one channel, used only as a hint to read again."""

    def __init__(self, url: str, channel: str, coalesce_s: float = 0.0) -> None:
        self.client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2)
        self.channel = channel
        self.coalesce_s = coalesce_s
        self.pubsub: redis.asyncio.client.PubSub | None = None

    async def subscribe(self) -> redis.asyncio.client.PubSub | None:
        """Subscribe (once). Done before the waiter's first read, so that a change
        committed between that read and the first wait still wakes it. None: Redis is
        unavailable."""
        try:
            if self.pubsub is None:
                self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await self.pubsub.subscribe(self.channel)
            return self.pubsub
        except (redis.RedisError, OSError):
            log.debug("event wake-ups unavailable; re-reading on the interval", exc_info=True)
            await self._drop()
            return None

    async def wait(self, timeout_s: float) -> None:
        """Return on a wake-up, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            pubsub = await self.subscribe()
            if pubsub is None:
                await anyio.sleep(timeout_s)
                return
            # get_message returns None early for the (ignored) subscribe confirmation.
            while (remaining := deadline - time.monotonic()) > 0:
                if await pubsub.get_message(timeout=remaining) is not None:
                    await anyio.sleep(self.coalesce_s)
                    while await pubsub.get_message(timeout=0) is not None:
                        pass
                    return
        except (redis.RedisError, OSError):
            log.debug("event wake-ups unavailable; re-reading on the interval", exc_info=True)
            await self._drop()
            await anyio.sleep(max(0.0, deadline - time.monotonic()))

    async def _drop(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()

    async def close(self) -> None:
        # Shielded: this runs when the client disconnects, i.e. inside a cancellation.
        with anyio.CancelScope(shield=True):
            await self._drop()
            with contextlib.suppress(redis.RedisError, OSError):
                await self.client.aclose()
