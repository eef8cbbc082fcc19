"""Redis wake-ups after a job event's commit, for every waiter of one gateway process
through one Redis connection: a hint to re-read Postgres sooner.

Every waiter in the gateway (the SSE streams, ``/v1/predict``) reads the truth from
Postgres and only sleeps on this; common.event_log publishes after each commit that
recorded events. A waiter costs the hub a callback in a set, never a connection or a
thread: the hub subscribes to a channel while it has listeners and fans each message
out to them. Redis being down or dropping the connection degrades every waiter to its
interval re-read; when the hub is connected again it wakes them all, since what was
published in the gap is lost."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.requests import HTTPConnection

log = logging.getLogger(__name__)

# How long a new listener waits for Redis to confirm its subscription; past it, it goes on
# (a wake-up it misses costs it one interval re-read).
CONFIRM_S = 2.0
# Reconnecting after Redis went away: first and longest pause, s.
RECONNECT_S = (0.2, 5.0)
# Channels left without listeners are unsubscribed in one command at most this often.
UNSUBSCRIBE_EVERY_S = 1.0
# The longest one command (SUBSCRIBE, UNSUBSCRIBE, closing the connection) may take: the
# commands are shielded from cancellation, and a shield with no deadline would let one
# stuck socket hold the gateway's shutdown for ever.
COMMAND_S = 5.0

# Called with a message's data, or with None when the hub wakes every listener (on a
# reconnect, what was published in the gap being lost).
Callback = Callable[[bytes | None], None]


class WakeupHub:
    """One Redis pub/sub connection shared by every waiter of the process."""

    def __init__(self, url: str) -> None:
        # No retries inside redis-py: a broken connection is rebuilt here, whole, with
        # its subscriptions, so the confirmations below stay in step with the commands.
        self.client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        self._listeners: dict[str, set[Callback]] = {}
        # Per channel subscribed on the current connection: its confirmation. Redis answers
        # SUBSCRIBEs in order, so each confirmation resolves the oldest pending future.
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._pending: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._pubsub: redis.asyncio.client.PubSub | None = None
        self._lock = asyncio.Lock()  # one writer of commands at a time, in order
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="wakeup-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: shutdown goes on even if the reader is stuck in a command.
            with anyio.move_on_after(COMMAND_S), contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop()
        with anyio.move_on_after(COMMAND_S), contextlib.suppress(redis.RedisError, OSError):
            await self.client.aclose()

    @asynccontextmanager
    async def listen(self, channel: str, callback: Callback) -> AsyncIterator[None]:
        """Call ``callback`` (on the event loop; it must not block or raise) with each
        message on ``channel`` while inside, and with None on every reconnect. Subscribed
        on entry, before the waiter's first read, so that a change committed between that
        read and its first wait still wakes it."""
        listeners = self._listeners.setdefault(channel, set())
        listeners.add(callback)
        try:
            await self._subscribe(channel)
            yield
        finally:
            listeners.discard(callback)
            if not listeners and self._listeners.get(channel) is listeners:
                del self._listeners[channel]

    @asynccontextmanager
    async def wakeup(self, channel: str, coalesce_s: float = 0.0) -> AsyncIterator[Wakeup]:
        """``listen`` with a flag to sleep on: ``async with hub.wakeup(channel) as wake:
        ... await wake.wait(timeout_s)``."""
        wake = Wakeup(coalesce_s)
        async with self.listen(channel, wake.set):
            yield wake

    async def _subscribe(self, channel: str) -> None:
        confirmed = self._subscribed.get(channel)
        if confirmed is None:
            async with self._lock:
                pubsub = self._pubsub
                confirmed = self._subscribed.get(channel)
                if confirmed is None and pubsub is not None:
                    confirmed = await self._send_subscribe(pubsub, [channel])
        if confirmed is None:
            return  # not connected: the waiter re-reads on its interval
        with anyio.move_on_after(CONFIRM_S):
            await asyncio.shield(confirmed)

    async def _send_subscribe(
        self, pubsub: redis.asyncio.client.PubSub, channels: list[str]
    ) -> asyncio.Future[None] | None:
        """SUBSCRIBE (holding the lock): the future of the last channel's confirmation,
        None if the connection broke (the reader then rebuilds it)."""
        loop = asyncio.get_running_loop()
        futures = {channel: loop.create_future() for channel in channels}
        for channel, future in futures.items():
            self._subscribed[channel] = future
            self._pending.setdefault(channel, collections.deque()).append(future)
        try:
            # Shielded: a cancelled waiter must not leave half a command on the socket.
            with anyio.move_on_after(COMMAND_S, shield=True) as scope:
                await pubsub.execute_command("SUBSCRIBE", *channels)
            if scope.cancelled_caught:
                raise redis.TimeoutError(f"SUBSCRIBE took over {COMMAND_S:g}s")
        except (redis.RedisError, OSError):
            log.debug("subscribe failed; the hub reconnects", exc_info=True)
            await self._break(pubsub)
            return None
        return futures[channels[-1]] if channels else None

    async def _unsubscribe_idle(self, pubsub: redis.asyncio.client.PubSub) -> None:
        async with self._lock:
            idle = [c for c in self._subscribed if c not in self._listeners]
            if not idle or self._pubsub is not pubsub:
                return
            for channel in idle:
                del self._subscribed[channel]
            with anyio.move_on_after(COMMAND_S, shield=True):
                await pubsub.execute_command("UNSUBSCRIBE", *idle)

    async def _run(self) -> None:
        pause = RECONNECT_S[0]
        while True:
            try:
                await self._connect()
                pause = RECONNECT_S[0]
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis down, or a reply it could not parse
                log.debug("event wake-ups lost; reconnecting", exc_info=True)
            await self._drop()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_S[1])

    async def _connect(self) -> None:
        pubsub = self.client.pubsub()
        await pubsub.connect()
        async with self._lock:
            self._pubsub = pubsub
            channels = list(self._listeners)
            if channels:
                await self._send_subscribe(pubsub, channels)
        # Whatever was published while no connection stood is lost: read again now.
        self._wake_all()

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        loop = asyncio.get_running_loop()
        tidy_at = loop.time() + UNSUBSCRIBE_EVERY_S
        while self._pubsub is pubsub:
            message = await pubsub.get_message(timeout=UNSUBSCRIBE_EVERY_S)
            if message is not None:
                self._dispatch(message)
            if loop.time() >= tidy_at:
                await self._unsubscribe_idle(pubsub)
                tidy_at = loop.time() + UNSUBSCRIBE_EVERY_S
        raise ConnectionError("a subscribe found the connection broken")

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        raw = message["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "subscribe":
            pending = self._pending.get(channel)
            if pending:
                future = pending.popleft()
                if not pending:
                    del self._pending[channel]
                if not future.done():
                    future.set_result(None)
        elif kind == "message":
            data = message["data"]
            payload = data if isinstance(data, bytes) else str(data).encode()
            for callback in list(self._listeners.get(channel, ())):
                callback(payload)

    def _wake_all(self) -> None:
        for listeners in list(self._listeners.values()):
            for callback in list(listeners):
                callback(None)

    async def _break(self, pubsub: redis.asyncio.client.PubSub) -> None:
        """Forget ``pubsub`` (the reader sees it gone and reconnects); holding the lock."""
        if self._pubsub is pubsub:
            self._pubsub = None
            self._release_pending()

    def _release_pending(self) -> None:
        # Nobody waits for a confirmation that will never come.
        for pending in self._pending.values():
            for future in pending:
                if not future.done():
                    future.set_result(None)
        self._pending.clear()
        self._subscribed.clear()

    async def _drop(self) -> None:
        async with self._lock:
            pubsub, self._pubsub = self._pubsub, None
            self._release_pending()
        if pubsub is not None:
            shielded = anyio.move_on_after(COMMAND_S, shield=True)
            with shielded, contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()


class Wakeup:
    """A flag the hub sets on each message; a waiter sleeps on it."""

    def __init__(self, coalesce_s: float) -> None:
        self.coalesce_s = coalesce_s
        self._event = asyncio.Event()

    def set(self, data: bytes | None = None) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        """Return on a wake-up (after ``coalesce_s``, folding a burst into one), or after
        ``timeout_s``."""
        with anyio.move_on_after(timeout_s):
            await self._event.wait()
            await anyio.sleep(self.coalesce_s)
        # Cleared before the caller reads again: a message after this wakes the next wait.
        self._event.clear()


# Async, so that FastAPI calls it on the event loop, not in the thread pool.
async def get_hub(conn: HTTPConnection) -> WakeupHub:
    hub: WakeupHub = conn.app.state.wakeups
    return hub
