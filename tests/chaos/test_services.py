"""Faults of the services and of the inputs (issue 4, faults 5-8), on a stack of its own
that these tests crash and restart: Redis (restart without persistence, FLUSHALL),
Postgres (restart under worker writes), the object store (an object deleted, the store
down), and poison inputs that crash or hang the decoder or the model. Every case ends
with every accepted job done or explicitly failed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from hepato.common.migrate import run_migrations
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from hepato.devstack.localstack import LocalStack
from hepato.worker.backends.base import Model
from tests.chaos import poison
from tests.chaos.conftest import drop_inline, ids, judge, ledger
from tests.e2e.conftest import reset
from tests.e2e.test_pipeline import db_jobs, slow_models_dir, submit, thirty_two, upload

pytestmark = pytest.mark.slow

TERMINAL = {"done", "failed"}
# worker.recovery's line when a write of results (complete, or fail) meets a Postgres outage.
MID_WRITE = re.compile(r"Postgres unavailable in (complete|fail) ")


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    # Not under pytest's tmp_path: embedded Postgres runs as its own user, which cannot
    # enter pytest's private (0700) base directory for pg_ctl.
    with tempfile.TemporaryDirectory(prefix="hepato-chaos-") as root:
        s = LocalStack(Path(root)).start()
        try:
            run_migrations(s.database_url)
            yield s
        finally:
            s.stop()


@pytest.fixture
def cs(stack: LocalStack, base_settings: Settings) -> Settings:
    """Settings on the crashable stack, with a clean database and Redis."""
    settings = base_settings.model_copy(
        update={
            "database_url": stack.database_url,
            "redis_url": stack.redis_url,
            "s3_endpoint": stack.s3_endpoint,
        }
    )
    reset(settings)
    return settings


@pytest.fixture
def gateway(cs: Settings) -> Iterator[TestClient]:
    from hepato.gateway.app import create_app

    with TestClient(create_app(cs)) as client:
        yield client


def start_worker(stack: LocalStack, cs: Settings, tmp_path: Path, name: str) -> subprocess.Popen:
    """A worker process with a slowed model, recovery timers short, its log in tmp_path."""
    env = {
        **os.environ,
        **stack.env(),
        "HEPATO_S3_BUCKET": cs.s3_bucket,
        "HEPATO_WORKER_ID": name,
        "HEPATO_MODELS_DIR": str(slow_models_dir(cs, tmp_path / "slow-models")),
        "HEPATO_MAX_BATCH_SIZE": "8",
        "HEPATO_LEASE_S": "6",
        "HEPATO_LEASE_EXTEND_EVERY_S": "1",
        "HEPATO_SWEEP_INTERVAL_S": "0.5",
        "HEPATO_REQUEUE_PENDING_AFTER_S": "2",
        "HEPATO_POLL_TIMEOUT_S": "0.2",
    }
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "hepato", "worker"], env=env, stdout=log, stderr=log
    )


def wait_for(cs: Settings, predicate, timeout_s: float, what: str) -> list[Job]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = db_jobs(cs)
        if predicate(jobs):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {Counter(j.state for j in db_jobs(cs))}")


def in_flight(jobs: list[Job]) -> int:
    return sum(j.state in ("pending", "processing") for j in jobs)


def all_finished(submitted: int):  # type: ignore[no-untyped-def]
    return lambda jobs: len(jobs) == submitted and all(j.state in TERMINAL for j in jobs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def refused_while_down(gateway: TestClient, cs: Settings, service: str) -> None:
    before = len(db_jobs(cs)) if service != "database" else None
    response = gateway.post("/v1/batches", files=upload(thirty_two()[:2]))
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] and service in response.json()["detail"]
    if before is not None:
        assert len(db_jobs(cs)) == before, "nothing half-accepted"


def finish(cs: Settings, submitted: int, proc: subprocess.Popen) -> list[Job]:
    jobs = wait_for(cs, all_finished(submitted), 180, "every job to finish")
    assert proc.poll() is None, "the worker survived without a restart"
    assert Counter(j.state for j in jobs) == {"done": submitted}
    assert all(j.result and j.result["task"] == "detect" for j in jobs)
    return jobs


@pytest.mark.parametrize("fault", ["restart", "flushall"])
def test_redis_lost_with_jobs_queued_and_in_flight(
    stack: LocalStack, cs: Settings, gateway: TestClient, tmp_path: Path, fault: str
) -> None:
    accepted = ids(*(submit(gateway, thirty_two()) for _ in range(2)))
    with ledger(cs) as read:
        proc = start_worker(stack, cs, tmp_path, f"redis-{fault}")
        try:
            jobs = wait_for(cs, lambda js: any(j.state == "processing" for j in js), 120, "a claim")
            flying = in_flight(jobs)
            if fault == "restart":
                stack.kill_service("redis")
                refused_while_down(gateway, cs, "Redis")
                stack.start_redis()
            else:
                redis.Redis.from_url(cs.redis_url).flushall()
            finish(cs, len(accepted), proc)
        finally:
            stop(proc)
        judge(cs, f"Redis {fault} (queued + in flight)", accepted, read, flying)


def test_postgres_restarted_during_worker_writes(
    stack: LocalStack, cs: Settings, gateway: TestClient, tmp_path: Path
) -> None:
    accepted = ids(*(submit(gateway, thirty_two()) for _ in range(2)))
    with ledger(cs) as read:
        proc = start_worker(stack, cs, tmp_path, "pg-restart")
        try:
            jobs = wait_for(cs, lambda js: any(j.state == "done" for j in js), 120, "results")
            flying = in_flight(jobs)
            stack.stop_postgres()
            log = tmp_path / "pg-restart.log"
            try:
                refused_while_down(gateway, cs, "database")
                # The outage lasts until the worker has met it in a write of its results.
                deadline = time.monotonic() + 60
                while not MID_WRITE.search(log.read_text(errors="replace")):
                    assert time.monotonic() < deadline, "the worker never met the outage"
                    time.sleep(0.1)
            finally:
                stack.start_postgres_again()
            finish(cs, len(accepted), proc)
        finally:
            stop(proc)
        judge(cs, "Postgres restarted under worker writes", accepted, read, flying)


def test_a_deleted_object_fails_its_job_and_the_rest_of_the_batch_succeeds(
    cs: Settings, gateway: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    batch = submit(gateway, thirty_two()[:8])
    victim = batch["jobs"][3]["job_id"]
    job = next(j for j in db_jobs(cs) if str(j.id) == victim)
    ObjectStore(cs).client.remove_object(cs.s3_bucket, job.object_key)
    drop_inline(cs, [victim])  # its copy in Redis expired too: only the store is left
    with ledger(cs) as read:
        worker = Worker(cs, models, burst=True)
        worker.run(install_signals=False)
        judge(cs, "object deleted from the store", ids(batch), read, 8)
    jobs = {str(j.id): j for j in db_jobs(cs)}
    assert jobs[victim].state == "failed" and jobs[victim].attempts == 1, "no pointless retry"
    assert "gone from the object store" in (jobs[victim].error or "")
    assert all(j.state == "done" for i, j in jobs.items() if i != victim)
    assert worker.batches == 1, "the other seven ran in the same microbatch"


def test_object_store_down_retries_then_fails_then_recovers(
    stack: LocalStack, cs: Settings, gateway: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    batch = submit(gateway, thirty_two()[:4])
    drop_inline(cs, ids(batch))  # the images must come from the store
    with ledger(cs) as read:
        stack.kill_service("seaweedfs")
        try:
            refused_while_down(gateway, cs, "object store")
            started = time.monotonic()
            Worker(cs, models, burst=True).run(install_signals=False)
            took = time.monotonic() - started
        finally:
            stack.start_s3()
        judge(cs, "object store down", ids(batch), read, 4)
    jobs = db_jobs(cs)
    assert len(jobs) == 4
    for job in jobs:
        assert job.state == "failed" and job.attempts == cs.max_attempts
        assert "object store unreachable" in (job.error or "")
    assert took < 60, f"bounded retries, then failed ({took:.0f}s)"
    submit(gateway, thirty_two()[:2])
    Worker(cs, models, burst=True).run(install_signals=False)
    assert Counter(j.state for j in db_jobs(cs)) == {"failed": 4, "done": 2}


def post(gateway: TestClient, files: list) -> list[str]:  # type: ignore[type-arg]
    response = gateway.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == len(files)
    return ids(response.json())


def test_a_decoder_crash_or_hang_fails_only_the_poison_jobs(
    cs: Settings, gateway: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    files = [("files", (f"ok{i}.png", poison.png(), "image/png")) for i in range(4)]
    files += [
        ("files", ("crash.png", poison.png(poison.CRASH), "image/png")),
        ("files", ("hang.png", poison.png(poison.HANG), "image/png")),
    ]
    accepted = post(gateway, files)
    settings = cs.model_copy(update={"decode_timeout_s": 3.0})
    with ledger(cs) as read:
        worker = Worker(settings, models, burst=True, decode=poison.decode_or_die)
        worker.run(install_signals=False)  # returns: the worker survived
        judge(cs, "decoder crashes / hangs on a poison file", accepted, read, 6)
    jobs = {j.filename: j for j in db_jobs(cs)}
    for name in ("crash.png", "hang.png"):
        assert jobs[name].state == "failed" and jobs[name].attempts == cs.max_attempts
        assert "decoder crashed or took longer than 3s" in (jobs[name].error or "")
    ok = [j for n, j in jobs.items() if n.startswith("ok")]
    assert all(j.state == "done" and j.attempts == 1 for j in ok)


def test_a_model_that_raises_on_one_image_fails_only_that_job(
    cs: Settings, gateway: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    files = [("files", (f"ok{i}.png", poison.png(), "image/png")) for i in range(5)]
    files.append(("files", ("bad.png", poison.png(pixel=poison.RAISE_PIXEL), "image/png")))
    accepted = post(gateway, files)
    poisoned = {name: poison.PoisonedModel(m) for name, m in models.items()}
    with ledger(cs) as read:
        Worker(cs, poisoned, burst=True).run(install_signals=False)  # type: ignore[arg-type]
        judge(cs, "model raises on a poison image", accepted, read, 6)
    jobs = {j.filename: j for j in db_jobs(cs)}
    assert jobs["bad.png"].state == "failed" and jobs["bad.png"].attempts == cs.max_attempts
    assert "the model failed on this image" in (jobs["bad.png"].error or "")
    assert all(j.state == "done" and j.attempts == 1 for n, j in jobs.items() if n != "bad.png")


def test_a_hung_model_call_is_cut_and_the_worker_goes_on(
    cs: Settings, gateway: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    # One job per microbatch: a cut call retries its whole batch (see Worker._infer).
    settings = cs.model_copy(update={"model_timeout_s": 1.0, "max_batch_size": 1})
    poisoned = {name: poison.PoisonedModel(m) for name, m in models.items()}
    hang = [("files", ("hang.png", poison.png(pixel=poison.HANG_PIXEL), "image/png"))]
    ok = [("files", ("ok.png", poison.png(), "image/png"))]
    with ledger(cs) as read:
        accepted = post(gateway, hang) + post(gateway, ok)
        # One run: after cutting the hung call, the same worker serves the next job.
        Worker(settings, poisoned, burst=True).run(install_signals=False)  # type: ignore[arg-type]
        judge(cs, "model call hangs on a poison image", accepted, read, 2)
    jobs = {j.filename: j for j in db_jobs(cs)}
    assert jobs["hang.png"].state == "failed" and jobs["hang.png"].attempts == cs.max_attempts
    assert "the model call took longer than 1s" in (jobs["hang.png"].error or "")
    assert jobs["ok.png"].state == "done"
