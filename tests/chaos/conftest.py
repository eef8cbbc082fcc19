"""Chaos fixtures: worker subprocesses that are always reaped, a ledger of every write
that sets a job done (so a second completion cannot hide behind an equal result), the
end-of-case verdict, and the figures each case appends for the README table."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from hepato.common.constants import inline_key, worker_key
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from tests.conftest import REPO
from tests.e2e import conftest as e2e
from tests.e2e.test_pipeline import db_jobs

# The end-to-end fixtures, for this folder too (real services, clean state per test).
base_settings = e2e.base_settings
settings = e2e.settings
client = e2e.client
models = e2e.models
run_worker = e2e.run_worker
worker_env = e2e.worker_env

# worker_env turns the sweeper off and leaves leases renewed every 10 s (longer than the
# 4 s test lease); a chaos worker must recover others' jobs and keep its own.
SWEEPING = {
    "HEPATO_SWEEP_INTERVAL_S": "0.5",
    "HEPATO_REQUEUE_PENDING_AFTER_S": "3",
    "HEPATO_LEASE_EXTEND_EVERY_S": "1",
}


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Spawned:
    worker_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, redis_url: str, timeout_s: float = 60.0) -> None:
        """A worker sets its heartbeat once its models are loaded."""
        client = redis.Redis.from_url(redis_url)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.worker_id} exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            return bool(client.exists(worker_key(self.worker_id)))

        wait_for(f"{self.worker_id} to load its model", ready, timeout_s)

    def stop(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM, then the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        return code, time.monotonic() - started

    def reap(self) -> None:
        """Kill the worker and its decoder processes: a SIGKILLed worker's children
        outlive it, but stay in its process group."""
        with contextlib.suppress(ProcessLookupError):  # SIGKILL ends a stopped one too
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def spawn_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Spawned]]:
    """Start ``python -m <module> worker`` (default the real CLI) with the test services,
    the sweeper on, and stdout+stderr in ``tmp_path/<worker_id>.log``. Every process
    started is killed at teardown, whatever the test did."""
    started: list[Spawned] = []

    def spawn(worker_id: str, *, module: str = "hepato", **env: str) -> Spawned:
        log = tmp_path / f"{worker_id}.log"
        full = {**worker_env, **SWEEPING, "HEPATO_WORKER_ID": worker_id, **env}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "worker"],
                env=full,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, reaped as one
            )
        spawned = Spawned(worker_id, proc, log)
        started.append(spawned)
        return spawned

    try:
        yield spawn
    finally:
        for spawned in started:
            spawned.reap()


@dataclass(frozen=True)
class Completion:
    """One write that set a job ``done``, as the row looked right after it."""

    worker_id: str | None
    lease_token: uuid.UUID | None
    attempts: int
    finished_at: Any
    result: dict[str, Any] | None


_LEDGER_DDL = """
DROP TRIGGER IF EXISTS chaos_completion ON jobs;
DROP TABLE IF EXISTS chaos_completions;
CREATE TABLE chaos_completions (
    job_id uuid, worker_id text, lease_token uuid, attempts int,
    finished_at timestamptz, result jsonb, seq bigserial
);
CREATE OR REPLACE FUNCTION chaos_record_completion() RETURNS trigger AS $$
BEGIN
    INSERT INTO chaos_completions (job_id, worker_id, lease_token, attempts, finished_at, result)
    VALUES (NEW.id, NEW.worker_id, NEW.lease_token, NEW.attempts, NEW.finished_at, NEW.result);
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER chaos_completion AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (NEW.state = 'done') EXECUTE FUNCTION chaos_record_completion();
"""


@contextlib.contextmanager
def ledger(settings: Settings) -> Iterator[Callable[[], dict[uuid.UUID, list[Completion]]]]:
    """Every update that leaves a job ``done``, recorded by a trigger (test-only DDL,
    dropped afterwards). Nothing may touch a done job, so a job with two entries was
    completed twice, even if both writes carried the same result."""
    engine = get_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(text(_LEDGER_DDL))

    def read() -> dict[uuid.UUID, list[Completion]]:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT job_id, worker_id, lease_token, attempts, finished_at, result "
                    "FROM chaos_completions ORDER BY seq"
                )
            ).all()
        found: dict[uuid.UUID, list[Completion]] = {}
        for job_id, *rest in rows:
            found.setdefault(job_id, []).append(Completion(*rest))
        return found

    try:
        yield read
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS chaos_completion ON jobs"))
            conn.execute(text("DROP FUNCTION IF EXISTS chaos_record_completion()"))
            conn.execute(text("DROP TABLE IF EXISTS chaos_completions"))


@pytest.fixture
def completions(settings: Settings) -> Iterator[Callable[[], dict[uuid.UUID, list[Completion]]]]:
    with ledger(settings) as read:
        yield read


@dataclass
class Verdict:
    jobs: dict[uuid.UUID, Any]
    lost: list[uuid.UUID] = field(default_factory=list)
    duplicated: list[uuid.UUID] = field(default_factory=list)
    redelivered: int = 0


def verdict(
    settings: Settings,
    accepted: Iterable[uuid.UUID | str],
    ledger: dict[uuid.UUID, list[Completion]],
) -> Verdict:
    """Lost: an accepted job missing or not ``done``/``failed``. Duplicated: completed
    more than once, or its row no longer carries the one completion the ledger saw (a
    late write replaced the winner's). Redelivered: claimed more than once."""
    jobs = {j.id: j for j in db_jobs(settings)}
    out = Verdict(jobs)
    for raw in accepted:
        job_id = uuid.UUID(str(raw))
        job = jobs.get(job_id)
        if job is None or job.state not in ("done", "failed"):
            out.lost.append(job_id)
            continue
        out.redelivered += job.attempts > 1
        seen = ledger.get(job_id, [])
        if job.state != "done":
            if seen:
                out.duplicated.append(job_id)  # done once, then rewritten
            continue
        if len(seen) != 1 or (seen[0].worker_id, seen[0].finished_at, seen[0].result) != (
            job.worker_id,
            job.finished_at,
            job.result,
        ):
            out.duplicated.append(job_id)
    return out


def record(
    fault: str,
    submitted: int,
    in_flight: int,
    lost: int,
    duplicated: int,
    redelivered: int,
    **extra: object,
) -> None:
    """Print a case's figures and append them as a JSON line to ``$HEPATO_CHAOS_REPORT``
    (when set), so one run produces the README table."""
    line = {
        "fault": fault,
        "submitted": submitted,
        "in_flight": in_flight,
        "lost": lost,
        "duplicated": duplicated,
        "redelivered": redelivered,
        **extra,
    }
    print(f"chaos figures: {json.dumps(line)}")
    path = os.environ.get("HEPATO_CHAOS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def drop_inline(settings: Settings, job_ids: list[str]) -> None:
    """Remove the inline copies of these jobs' images (common.dispatch), as their expiry
    would: a test of the object store's faults needs the images to come from the store."""
    client = redis.Redis.from_url(settings.redis_url)
    assert client.delete(*(inline_key(j) for j in job_ids)) == len(job_ids)


def ids(*responses: dict[str, Any]) -> list[str]:
    """The job ids the submissions' answers accepted."""
    return [job["job_id"] for r in responses for job in r["jobs"]]


def judge(
    settings: Settings,
    fault: str,
    accepted: list[str],
    read: Callable[[], dict[uuid.UUID, list[Completion]]],
    in_flight: int | None = None,
    **extra: object,
) -> None:
    """Every accepted job done or failed, none completed twice; the figures recorded.
    ``in_flight`` defaults to every accepted job."""
    v = verdict(settings, accepted, read())
    flying = len(accepted) if in_flight is None else in_flight
    record(fault, len(accepted), flying, len(v.lost), len(v.duplicated), v.redelivered, **extra)
    assert not v.lost, f"lost: {v.lost}"
    assert not v.duplicated, f"completed twice: {v.duplicated}"
