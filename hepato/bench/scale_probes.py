"""What ``hepato bench scale`` reads off Postgres while workers run: lock waits, sampled
from pg_stat_activity and pg_locks in a thread (the event log's advisory lock told
apart), and the server's CPU seconds from the kernel's accounting (psutil)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
from sqlalchemy import Engine, text

from hepato.bench import cpu
from hepato.common import event_log
from hepato.devstack.localstack import LocalStack

# The event log's global lock, while it has one: a later event log may order its ids
# without it, and then every advisory wait counts as other.
LOG_LOCK_KEY: int | None = getattr(event_log, "_LOG_LOCK_KEY", None)

_WAITS = text("""
SELECT a.wait_event_type, a.wait_event, l.locktype, l.classid, l.objid
FROM pg_stat_activity a
LEFT JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
WHERE a.wait_event_type IN ('Lock', 'LWLock') AND a.pid <> pg_backend_pid()
""")


class LockSampler(threading.Thread):
    """Every ``period_s``, which backends wait on a lock: each one seen adds the time
    since the previous sample to the total, so the sum estimates the seconds spent
    waiting (waits much shorter than the period are seen in proportion)."""

    def __init__(self, engine: Engine, period_s: float) -> None:
        super().__init__(name="lock-sampler", daemon=True)
        self.engine, self.period_s = engine, period_s
        self.stop_event = threading.Event()
        self.waits: dict[str, float] = {}
        self.samples = 0

    def run(self) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            last = time.perf_counter()
            while not self.stop_event.wait(self.period_s):
                rows = conn.execute(_WAITS).all()
                now = time.perf_counter()
                self.samples += 1
                for wait_type, wait_event, locktype, classid, objid in rows:
                    if locktype == "advisory" and (classid, objid) == (0, LOG_LOCK_KEY):
                        key = "advisory: event log"
                    elif locktype is None and wait_type == "Lock":
                        # pg_locks is read after pg_stat_activity: the wait ended between.
                        key = f"Lock: {wait_event} (ended before pg_locks was read)"
                    else:
                        key = f"{wait_type}: {locktype or wait_event}"
                    self.waits[key] = self.waits.get(key, 0.0) + (now - last)
                last = now

    def finish(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join()
        total = sum(self.waits.values())
        log_lock = self.waits.get("advisory: event log", 0.0)
        return {
            "total_s": round(total, 3),
            "event_log_lock_s": round(log_lock, 3),
            "event_log_share": round(log_lock / total, 3) if total else None,
            "by_kind_s": {k: round(v, 3) for k, v in sorted(self.waits.items())},
            "samples": self.samples,
            "period_ms": round(self.period_s * 1000, 1),
        }


def postgres_cpu_s(local: LocalStack) -> float:
    """CPU seconds of the Postgres server so far, backends that have exited included
    (the postmaster has reaped them: its children's times)."""
    pid = cpu._postmaster(local)
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        return total + cpu._cpu(root.children(recursive=True))
    except psutil.Error:
        return 0.0
