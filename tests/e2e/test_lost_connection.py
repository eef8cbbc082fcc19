"""A connection lost under ``event_log.transaction`` (Postgres restarted, the backend
killed) surfaces as the OperationalError that callers retry (tenacity's ``db_retry``,
the worker's intake loop), never as SQLAlchemy's PendingRollbackError: that one, from
reading the dead connection's ``info`` on the way out, killed the worker's intake stage
when its claim met a Postgres restart. Real Postgres: the backend is terminated."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from hepato.common import event_log
from hepato.common.db import get_engine
from hepato.common.settings import Settings


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transaction"])
def test_a_lost_connection_is_an_operational_error_and_the_next_one_works(
    settings: Settings, autocommit: bool
) -> None:
    engine = create_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with get_engine(settings.database_url).connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            deadline = time.monotonic() + 10
            while admin.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar():
                assert time.monotonic() < deadline, "the backend outlived its termination"
                time.sleep(0.05)
        # The pool hands out the dead connection: its first statement meets the loss.
        with (
            pytest.raises(OperationalError),
            event_log.transaction(engine, autocommit=autocommit) as conn,
        ):
            conn.execute(text("SELECT 1"))
        with event_log.transaction(engine, autocommit=autocommit) as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
