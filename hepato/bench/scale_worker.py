"""One burst-mode worker of ``hepato bench scale``: ``hepato worker --burst``'s Worker,
started on the bench's word once its models are loaded, that also times each
job-state transaction it commits, counts its statements, and writes them to the JSON
file named by its first argument when it has drained the queue.

The timing wraps ``event_log.transaction``, which every claim and complete goes
through: from BEGIN to the end of COMMIT (the wake-up publish after it is left out).
A transaction is told apart by its UPDATE of ``jobs``: a claim counts an attempt, a
complete writes the result; others (a sweep, a failure) are not timed."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event

from hepato.common import event_log, wake_publish

_STATEMENTS = "hepato.bench.statements"
_WRITES = ("INSERT", "UPDATE", "DELETE")
# Writes as data-modifying CTEs of a statement (event_log.record_change):
# "WITH name AS (...), name AS (...) <statement>".
_WITH = re.compile(r"^\s*WITH\s+", re.IGNORECASE)
_CTE = re.compile(r"\s*,?\s*\w+\s+AS\s+\(", re.IGNORECASE)


def _heads(sql: str) -> list[str]:
    """The statements one statement runs: each CTE's, then its own."""
    match = _WITH.match(sql)
    if match is None:
        return [sql.lstrip().upper()]
    heads, pos = [], match.end()
    while (cte := _CTE.match(sql, pos)) is not None:
        depth, end = 1, cte.end()
        while depth and end < len(sql):
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            end += 1
        heads.append(sql[cte.end() : end - 1].lstrip().upper())
        pos = end
    return [*heads, sql[pos:].lstrip().upper()]


_lock = threading.Lock()
_found: dict[str, dict[str, list[float]]] = {
    kind: {"seconds": [], "writes": [], "jobs_writes": []} for kind in ("claim", "complete")
}
_committed = threading.local()


def kind_of(statements: list[str]) -> str | None:
    """claim, complete or None (another transition: a fail, a sweep), by the UPDATE of
    ``jobs`` among ``statements``."""
    for sql in statements:
        if not any(head.startswith("UPDATE JOBS") for head in _heads(sql)):
            continue
        # The claim is the one write that counts an attempt; the sweeper's and a
        # failure's writes also touch the lease token.
        if "attempts=(jobs.attempts +" in sql:
            return "claim"
        if "result=" in sql:
            return "complete"
    return None


def _is_write(sql: str) -> bool:
    return any(head.startswith(_WRITES) for head in _heads(sql))


def _writes_jobs(sql: str) -> bool:
    jobs = ("UPDATE JOBS ", "INSERT INTO JOBS ", "DELETE FROM JOBS ")
    return any(head.startswith(jobs) for head in _heads(sql))


def _seen(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
    statements = conn.info.get(_STATEMENTS)
    if statements is not None:
        statements.append(statement)


_plain_transaction = event_log.transaction
_plain_publish = wake_publish.publish


def _publish(engine: Engine, channels: Any, messages: Any = None) -> None:
    # Called by event_log.transaction right after COMMIT returned: the transaction's end.
    _committed.at = time.perf_counter()
    _plain_publish(engine, channels, messages)


@contextmanager
def _timed(engine: Engine, **options: Any) -> Iterator[Connection]:
    statements: list[str] = []
    _committed.at = None
    started = time.perf_counter()
    with _plain_transaction(engine, **options) as conn:
        conn.info[_STATEMENTS] = statements
        try:
            yield conn
        finally:
            conn.info.pop(_STATEMENTS, None)
    # Only committed transactions get here.
    ended = getattr(_committed, "at", None) or time.perf_counter()
    kind = kind_of(statements)
    if kind is None:
        return
    writes = [s for s in statements if _is_write(s)]
    with _lock:
        found = _found[kind]
        found["seconds"].append(ended - started)
        found["writes"].append(len(writes))
        found["jobs_writes"].append(sum(_writes_jobs(s) for s in writes))


def install() -> None:
    event.listen(Engine, "before_cursor_execute", _seen)
    event_log.transaction = _timed
    wake_publish.publish = _publish


def main() -> None:
    out, ready_key, go_key = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    install()
    import redis

    from hepato.common.settings import get_settings
    from hepato.worker.backends.base import load_models
    from hepato.worker.runner import Worker

    settings = get_settings()
    worker = Worker(settings, load_models(settings, settings.worker_models), burst=True)
    # Every worker starts draining at once, not as each finishes importing: the bench
    # says go once all are ready.
    client = redis.Redis.from_url(settings.redis_url)
    client.incr(ready_key)
    while not client.exists(go_key):
        time.sleep(0.01)
    client.close()
    worker.run()
    with _lock:
        found = {"transactions": _found, "jobs_done": worker.jobs_done, "batches": worker.batches}
        out.write_text(json.dumps(found))


if __name__ == "__main__":
    main()
