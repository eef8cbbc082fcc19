"""Live status over Server-Sent Events, on real Postgres, Redis and S3, read through real
uvicorn servers (the TestClient buffers streams) while a worker runs in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from httpx_sse import connect_sse
from sqlalchemy import select

from hepato.common import event_log, wake_publish
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import JobEvent
from hepato.common.tenants import create_key
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_pipeline import upload
from tests.server import serve as serve_app

pytestmark = pytest.mark.slow

JOBS = 4


@dataclass(frozen=True)
class Sse:
    event: str
    id: str
    data: dict[str, Any]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve(settings: Settings) -> Iterator[Callable[[], str]]:
    """Start a gateway (uvicorn, own thread, own port) per call: each one a replica."""
    from hepato.gateway.app import create_app

    with ExitStack() as stack:
        yield lambda: stack.enter_context(serve_app(create_app(settings)))


def submit_batch(base: str, n: int = JOBS) -> dict[str, Any]:
    paths = [images(SAMPLES, "synthetic_*.png")[i % 3] for i in range(n)]
    response = httpx.post(f"{base}/v1/batches", files=upload(paths), timeout=30)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


class Reader(threading.Thread):
    """Reads one event stream to its end (or until ``stop_after`` events) in a thread."""

    def __init__(self, url: str, last_event_id: str | None = None, stop_after: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.last_event_id, self.stop_after = url, last_event_id, stop_after
        self.got: list[Sse] = []
        self.ended = False
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(60, read=30)) as http,
                connect_sse(http, "GET", self.url, headers=headers) as source,
            ):
                source.response.raise_for_status()
                for sse in source.iter_sse():
                    self.got.append(Sse(sse.event, sse.id, json.loads(sse.data)))
                    if self.stop_after and len(self.got) >= self.stop_after:
                        return  # drops the connection mid-stream
                self.ended = True
        except BaseException as exc:
            self.error = exc

    def wait_for(self, n: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.got) < n and self.is_alive():
            assert time.monotonic() < deadline, f"only {len(self.got)} of {n} events came"
            time.sleep(0.02)
        assert len(self.got) >= n and self.error is None, (self.got, self.error)

    def result(self, timeout_s: float = 60) -> list[Sse]:
        self.join(timeout_s)
        assert not self.is_alive(), f"the stream did not end; got {self.got}"
        assert self.error is None, self.error
        return self.got


def in_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def logged(settings: Settings, batch_id: str) -> list[tuple[str, str, str]]:
    """The batch's event log as stored, in log order: (event id, job id, state)."""
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(
            select(JobEvent.xid, JobEvent.id, JobEvent.job_id, JobEvent.state)
            .where(JobEvent.batch_id == uuid.UUID(batch_id))
            .order_by(JobEvent.xid, JobEvent.id)
        ).all()
    return [(f"{x}-{i}", str(j), s) for x, i, j, s in rows]


def as_log(got: list[Sse]) -> list[tuple[str, str, str]]:
    return [(e.id, e.data["job_id"], e.data["state"]) for e in got if e.event == "job"]


def check_complete_batch_stream(got: list[Sse], accepted: dict[str, Any]) -> None:
    jobs = [e for e in got if e.event == "job"]
    ids = [event_log.parse_cursor(e.id) for e in jobs]
    assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"
    per_job: dict[str, list[str]] = {}
    for e in jobs:
        assert e.data["batch_id"] == accepted["batch_id"] and e.data["error"] is None
        assert e.data["at"]
        per_job.setdefault(e.data["job_id"], []).append(e.data["state"])
    assert per_job == {j["job_id"]: ["pending", "processing", "done"] for j in accepted["jobs"]}
    assert got[-1].event == "batch" and got[-1] is not jobs[-1]
    assert got[-1].data == {
        "batch_id": accepted["batch_id"],
        "state": "done",
        "counts": {
            "pending": 0,
            "processing": 0,
            "done": len(accepted["jobs"]),
            "failed": 0,
            "canceled": 0,
            "expired": 0,
        },
    }


def test_batch_stream_carries_every_state_change_in_order_then_the_batch_event(
    settings: Settings, serve: Callable[[], str], run_worker: Callable[..., object]
) -> None:
    base = serve()
    accepted = submit_batch(base)
    reader = Reader(f"{base}/v1/batches/{accepted['batch_id']}/events")
    reader.wait_for(JOBS)  # the pending events, before any worker runs
    assert {e.data["state"] for e in reader.got} == {"pending"}
    worker = in_thread(run_worker)
    got = reader.result()
    worker.join(60)
    assert reader.ended
    check_complete_batch_stream(got, accepted)
    assert as_log(got) == logged(settings, accepted["batch_id"])

    # The job stream: the same events of one job, ending after its terminal one.
    job_id = accepted["jobs"][0]["job_id"]
    one = Reader(f"{base}/v1/jobs/{job_id}/events").result()
    assert [e.data["state"] for e in one] == ["pending", "processing", "done"]
    assert {e.event for e in one} == {"job"}
    assert as_log(one) == [e for e in as_log(got) if e[1] == job_id]


def test_a_reconnect_with_last_event_id_misses_and_repeats_nothing(
    settings: Settings, serve: Callable[[], str], run_worker: Callable[..., object]
) -> None:
    base = serve()
    accepted = submit_batch(base)
    url = f"{base}/v1/batches/{accepted['batch_id']}/events"
    first = Reader(url, stop_after=JOBS + 2)
    first.wait_for(JOBS)
    worker = in_thread(run_worker)
    before = first.result()  # dropped after JOBS + 2 events, mid-batch
    assert len(before) == JOBS + 2 and not first.ended
    after = Reader(url, last_event_id=before[-1].id).result()
    worker.join(60)
    union = before + after
    check_complete_batch_stream(union, accepted)
    assert as_log(union) == logged(settings, accepted["batch_id"])

    # Resuming after the last job event: only the closing batch event, again.
    last_job_event = [e for e in union if e.event == "job"][-1]
    tail = Reader(url, last_event_id=last_job_event.id).result()
    assert [e.event for e in tail] == ["batch"] and tail[0].data == union[-1].data


def test_two_gateway_replicas_each_stream_every_event(
    settings: Settings, serve: Callable[[], str], run_worker: Callable[..., object]
) -> None:
    one, two = serve(), serve()
    accepted = submit_batch(one)
    readers = [Reader(f"{base}/v1/batches/{accepted['batch_id']}/events") for base in (one, two)]
    for reader in readers:
        reader.wait_for(JOBS)
    worker = in_thread(run_worker)
    got = [reader.result() for reader in readers]
    worker.join(60)
    for stream in got:
        check_complete_batch_stream(stream, accepted)
    assert as_log(got[0]) == as_log(got[1]) == logged(settings, accepted["batch_id"])


def test_events_survive_a_lost_wake_up_and_a_redis_flushall(
    settings: Settings,
    serve: Callable[[], str],
    run_worker: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = serve()
    accepted = submit_batch(base)
    reader = Reader(f"{base}/v1/batches/{accepted['batch_id']}/events")
    reader.wait_for(JOBS)
    # Every wake-up of the worker's commits is lost, then Redis is emptied and the
    # stream's subscription cut: only the interval re-read can deliver the rest.
    monkeypatch.setattr(wake_publish, "publish", lambda *args: None)
    run_worker()
    client = redis.Redis.from_url(settings.redis_url)
    client.flushall()
    client.client_kill_filter(_type="pubsub")
    done_at = time.monotonic()
    got = reader.result()
    waited = time.monotonic() - done_at
    check_complete_batch_stream(got, accepted)
    assert waited < settings.events_poll_interval_s + 2, waited


def test_streams_are_scoped_to_the_tenant(settings: Settings) -> None:
    from hepato.gateway.app import create_app

    engine = get_engine(settings.database_url)
    key_a = create_key(engine, "lab-a").key
    key_b = create_key(engine, "lab-b").key
    with TestClient(create_app(settings.model_copy(update={"auth": "required"}))) as client:
        paths = images(SAMPLES, "synthetic_*.png")[:2]
        response = client.post("/v1/batches", files=upload(paths), headers={"X-API-Key": key_a})
        assert response.status_code == 202, response.text
        accepted = response.json()
        job_id = accepted["jobs"][0]["job_id"]
        batch_url = f"/v1/batches/{accepted['batch_id']}/events"
        job_url = f"/v1/jobs/{job_id}/events"
        for url in (batch_url, job_url, f"/v1/jobs/{uuid.uuid4()}/events", "/v1/jobs/x/events"):
            answer = client.get(url, headers={"X-API-Key": key_b})
            assert answer.status_code == 404, (url, answer.text)
        assert client.get(job_url).status_code == 401

        # The owner's streams: canceled jobs are terminal, so both streams end.
        assert client.delete(f"/v1/batches/{accepted['batch_id']}", headers={"X-API-Key": key_a})
        owner = {"X-API-Key": key_a}
        with client.stream("GET", batch_url, headers=owner) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            body = stream.read().decode()
        assert body.count("event: job") == 4 and body.count("event: batch") == 1
        assert '"state": "canceled"' in body and '"state": "done_with_failures"' not in body
        with client.stream("GET", job_url, headers={**owner, "Last-Event-ID": "x"}) as stream:
            assert stream.status_code == 422
