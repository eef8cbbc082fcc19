"""Chaos, retries (issue 12): a failed attempt waits out an exponential, jittered backoff
before its retry, so an object store that restarts within seconds costs no job its
attempts; the crashable stack of test_services."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hepato.common import dispatch
from hepato.common.constants import queue_key
from hepato.common.jobs import Backoff, Requeue
from hepato.common.settings import Settings
from hepato.devstack.localstack import LocalStack
from hepato.worker.backends.base import Model
from tests.chaos import test_services as services
from tests.chaos.conftest import drop_inline, ids, judge, ledger
from tests.e2e.test_pipeline import db_jobs, submit, thirty_two

pytestmark = pytest.mark.slow

# The crashable stack's fixtures, for this module too.
stack, cs, gateway = services.stack, services.cs, services.gateway
wait_for = services.wait_for


def test_a_store_restart_of_seconds_fails_no_job(
    stack: LocalStack, cs: Settings, gateway: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    batch = submit(gateway, thirty_two()[:4])
    drop_inline(cs, ids(batch))
    # Retries after 7.5-15 s and 15-30 s more: longer than SeaweedFS takes to come back,
    # even on a loaded machine (18 s seen while other suites ran).
    worker = Worker(cs.model_copy(update={"retry_backoff_s": 15.0}), models, burst=True)
    with ledger(cs) as read:
        stack.kill_service("seaweedfs")
        run = threading.Thread(target=worker.run, kwargs={"install_signals": False})
        run.start()
        try:
            wait_for(
                cs,
                lambda jobs: jobs and all(j.attempts == 1 and j.state == "pending" for j in jobs),
                60,
                "every job's first attempt to fail on the dead store",
            )
        finally:
            stack.start_s3()
        run.join(120)
        assert not run.is_alive(), "the burst worker did not finish"
        judge(cs, "object store restarted within seconds", ids(batch), read, 4)
    jobs = db_jobs(cs)
    assert {j.state for j in jobs} == {"done"}, [(j.state, j.error) for j in jobs]
    assert all(j.attempts in (2, 3) for j in jobs)


def test_the_backoff_doubles_jitters_and_is_capped() -> None:
    backoff = Backoff(first_s=1.0, max_s=5.0)
    for attempts, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        waits = [backoff.delay_s(attempts) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits)
        assert max(waits) - min(waits) > full / 4, "jittered, not one instant for all"


def test_a_retry_waits_in_the_delayed_set_until_due(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    soon = Requeue(a, "m", "routine", delay_s=0.05)
    later = Requeue(b, "m", "routine", delay_s=60.0)
    dispatch.requeue(client, [soon, later, Requeue(c, "m", "routine")])

    def queued() -> list[uuid.UUID]:
        return [uuid.UUID(x.decode()) for x in client.lrange(queue_key("m", "routine"), 0, -1)]

    assert queued() == [c]
    wait_for(settings, lambda _: dispatch.release_due(client) == 1, 5, "the short wait to pass")
    assert queued() == [c, a]
    assert dispatch.release_due(client) == 0, "the long wait is not over"


@pytest.mark.parametrize("fault", ["a proxy's error page", "a download broken off"])
def test_one_objects_store_error_is_charged_to_its_job_alone(
    settings: Settings,
    client: TestClient,
    models: dict[str, Model],
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Every fetch of one object of a microbatch of 8 fails, in a way minio does not
    report as an S3 error; the seven others are done on their first attempt."""
    from minio import Minio
    from minio.error import ServerError
    from urllib3.exceptions import ProtocolError

    from hepato.worker.runner import Worker

    accepted = ids(submit(client, thirty_two()[:8]))
    drop_inline(settings, accepted)
    victim = next(j for j in db_jobs(settings) if str(j.id) == accepted[3])
    real_get = Minio.get_object

    def get_object(self: Minio, bucket: str, key: str, *args: Any, **kwargs: Any) -> Any:
        if key == victim.object_key and fault == "a proxy's error page":
            raise ServerError("504 Gateway Time-out (an HTML page)", 504)
        response = real_get(self, bucket, key, *args, **kwargs)
        if key == victim.object_key:
            response.read = lambda *a, **k: (_ for _ in ()).throw(  # type: ignore[method-assign]
                ProtocolError("Connection broken: IncompleteRead(1000 bytes read)")
            )
        return response

    monkeypatch.setattr(Minio, "get_object", get_object)
    hurried = settings.model_copy(update={"retry_backoff_s": 0.05, "max_batch_size": 8})
    with ledger(settings) as read:
        Worker(hurried, models, burst=True).run(install_signals=False)
        judge(settings, f"one object's store error ({fault}) in a batch of 8", accepted, read, 8)
    jobs = {str(j.id): j for j in db_jobs(settings)}
    bad = jobs.pop(accepted[3])
    assert bad.state == "failed" and bad.attempts == settings.max_attempts, bad.error
    assert {(j.state, j.attempts) for j in jobs.values()} == {("done", 1)}
