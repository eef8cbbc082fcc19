"""Workers frozen mid-batch (SIGSTOP) for the chaos suite: what they hold, read once
what they had already sent Postgres has run to its end."""

from __future__ import annotations

import signal
from typing import Any

from sqlalchemy import text

from hepato.common.db import get_engine, worker_connections
from hepato.common.settings import Settings
from tests.chaos.conftest import Spawned, wait_for
from tests.e2e.test_pipeline import db_jobs


def held_by(settings: Settings, worker_ids: set[str]) -> list[Any]:
    return [j for j in db_jobs(settings) if j.state == "processing" and j.worker_id in worker_ids]


def connections(settings: Settings, workers: list[Spawned], *, running: bool = False) -> int:
    """How many Postgres connections the workers have open under their names (each names
    its own: common.db.name_connections); ``running``: only those running a statement
    that will end on its own: not one waiting for a lock, which a frozen peer may hold for
    as long as it is frozen, nor one waiting to read from or write to its frozen client
    (it cannot commit before its client goes on). Read in a transaction of its own:
    pg_stat_activity is a snapshot per transaction."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(:names)"
    if running:
        query += " AND state = 'active' AND coalesce(wait_event_type, '') NOT IN ('Lock', 'Client')"
    names = [worker_connections(w.worker_id) for w in workers]
    with get_engine(settings.database_url).connect() as conn:
        return int(conn.execute(text(query), {"names": names}).scalar_one())


def frozen_holding(settings: Settings, workers: list[Spawned]) -> bool:
    """Stop ``workers`` (SIGSTOP) and say whether they hold a claimed job; if not, let them
    go on. Read while they run, a batch could commit between the read and the kill, and
    the kill then hit no batch (seen once in CI's suite: nothing redelivered). A statement
    sent before the stop runs to its end in Postgres: the read waits for it."""
    for w in workers:
        w.proc.send_signal(signal.SIGSTOP)
    held = False
    try:
        wait_for(
            "the frozen workers' statements ended",
            lambda: connections(settings, workers, running=True) == 0,
            timeout_s=30,
            every_s=0.002,
        )
        held = bool(held_by(settings, {w.worker_id for w in workers}))
        return held
    finally:
        if not held:
            for w in workers:
                w.proc.send_signal(signal.SIGCONT)
