"""The connection pool's ping: a connection that sat idle is checked before use (so a
Postgres restart costs no request), and a busy one is not (a round trip per transaction
saved on the real-time path)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from hepato.common.db import _ping_when_idle
from hepato.common.settings import Settings

pytestmark = pytest.mark.slow


def pooled(url: str, idle_s: float) -> tuple[Engine, list[str]]:
    """An engine with the ping, one pooled connection, and the SQL it sends (DBAPI
    level, so the ping's own SELECT 1 is seen)."""
    engine = create_engine(url, pool_size=1, max_overflow=0)
    _ping_when_idle(engine, idle_s)
    sent: list[str] = []

    @event.listens_for(engine, "connect")
    def trace(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        execute = dbapi_connection.execute

        def traced(query, *args, **kwargs):  # type: ignore[no-untyped-def]
            sent.append(str(query))
            return execute(query, *args, **kwargs)

        dbapi_connection.execute = traced

    return engine, sent


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def kill(url: str, pid: int) -> None:
    other = create_engine(url, poolclass=None)
    with other.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    other.dispose()


def test_a_connection_killed_while_idle_is_replaced_before_use(settings: Settings) -> None:
    url = settings.database_url
    engine, _ = pooled(url, idle_s=0.0)
    first = backend_pid(engine)
    kill(url, first)  # as a Postgres restart would
    # No error: the ping found the dead connection and the pool opened another.
    assert backend_pid(engine) != first
    engine.dispose()


def test_a_busy_connection_is_not_pinged(settings: Settings) -> None:
    engine, sent = pooled(settings.database_url, idle_s=60.0)
    for _ in range(5):
        backend_pid(engine)
    assert not [q for q in sent if q == "SELECT 1"]
    engine.dispose()
    # The same checkouts with every connection counted as idle: a ping each but the first.
    engine, sent = pooled(settings.database_url, idle_s=0.0)
    for _ in range(5):
        backend_pid(engine)
    assert len([q for q in sent if q == "SELECT 1"]) == 4
    engine.dispose()
