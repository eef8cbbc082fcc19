"""Wake-ups after a commit: the Redis channels that readers of the committed events sleep
on (gateway.wakeups), published once the commit is done (common.event_log), or gathered
for the caller to send in its own next Redis round trip (the gateway's push of the ids it
just committed: one round trip per submission rather than two). A wake-up is a hint: one
lost delays a reader until its interval re-read, never more."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import redis
from sqlalchemy import Engine

log = logging.getLogger(__name__)

# Which Redis each engine's writers publish on (set once per process by gateway and worker).
_publishers: dict[Engine, redis.Redis] = {}
# Inside ``gathered(engine)``: that engine and the channels its commits would publish.
_gathering: ContextVar[tuple[Engine, set[str]] | None] = ContextVar("wakes", default=None)


def attach(engine: Engine, client: redis.Redis) -> None:
    """Publish wake-ups for commits on ``engine`` through ``client``. Without it events
    are still written; readers then see them at their interval re-read."""
    _publishers[engine] = client


def publish(
    engine: Engine, channels: Collection[str], messages: Mapping[str, str] | None = None
) -> None:
    """Wake ``channels``, each with its message in ``messages`` if it has one, else "1".
    Gathered wake-ups (``gathered``) carry "1": a message is a shortcut for its reader,
    who reads the truth without it."""
    gathering = _gathering.get()
    if gathering is not None and gathering[0] is engine:
        gathering[1].update(channels)
        return
    client = _publishers.get(engine)
    if client is None or not channels:
        return
    try:
        pipe = client.pipeline(transaction=False)
        add_to(pipe, channels, messages)
        pipe.execute()
    except redis.RedisError:
        log.debug("wake-up not published; readers catch up at their interval", exc_info=True)


def add_to(
    pipe: redis.client.Pipeline,
    channels: Collection[str],
    messages: Mapping[str, str] | None = None,
) -> None:
    for channel in sorted(channels):
        pipe.publish(channel, (messages or {}).get(channel, "1"))


@contextmanager
def gathered(engine: Engine) -> Iterator[set[str]]:
    """The channels that commits on ``engine`` inside would publish, left to the caller
    to publish after them (``add_to``). Should the block raise, what it gathered is
    published on the way out (something may have committed before the error) and the
    set emptied, so that a caller that goes on does not send it again."""
    found: set[str] = set()
    token = _gathering.set((engine, found))
    try:
        yield found
    except BaseException:
        _gathering.reset(token)
        publish(engine, found)
        found.clear()
        raise
    _gathering.reset(token)
