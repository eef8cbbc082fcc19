"""Webhooks end to end: a real HTTP receiver on loopback, real services, real workers."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from standardwebhooks import Webhook

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import WebhookDelivery
from hepato.worker.backends.base import Model
from hepato.worker.runner import Worker
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_pipeline import upload

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"hepato-test-webhook-secret-32byt").decode()


@dataclass
class Receiver:
    """Answers 500 to the first ``fail_first`` requests, then 204; keeps every request."""

    fail_first: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(500 if len(state.requests) <= state.fail_first else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield state
    server.shutdown()
    thread.join(5)


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    # The receiver listens on loopback, which callbacks may reach only when listed.
    return settings.model_copy(
        update={
            "webhook_secret": SECRET,
            "webhook_backoff_s": 0.2,
            "webhook_allowed_hosts": ["127.0.0.1"],
        }
    )


def deliveries(settings: Settings) -> list[WebhookDelivery]:
    with get_engine(settings.database_url).connect() as conn:
        return [WebhookDelivery(**row._mapping) for row in conn.execute(select(WebhookDelivery))]


def sweep_until_delivered(worker: Worker, receiver: Receiver, timeout_s: float = 20) -> None:
    """Run the worker's webhook rounds (what its sender thread does) until one settles."""
    deadline = time.monotonic() + timeout_s
    while not any(d.state != "pending" for d in deliveries(worker.settings)):
        assert time.monotonic() < deadline, receiver.requests
        worker.webhooks.deliver_once()
        time.sleep(0.05)


def test_a_failing_receiver_gets_one_delivery_in_three_attempts_with_one_id(
    hook_settings: Settings, models: dict[str, Model], receiver: Receiver
) -> None:
    from hepato.gateway.app import create_app

    receiver.fail_first = 2
    with TestClient(create_app(hook_settings)) as client:
        path = images(SAMPLES, "synthetic_*.png")[0]
        response = client.post(
            "/v1/jobs",
            files={"file": (path.name, path.read_bytes())},
            data={"callback_url": receiver.url},
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
    # The worker that finishes the job leaves at once (burst): the delivery is in the
    # table, and another worker's sweeper delivers it.
    Worker(hook_settings, models, burst=True).run(install_signals=False)
    sweep_until_delivered(Worker(hook_settings, models), receiver)

    assert len(receiver.requests) == 3
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(ids) == 1
    for headers, body in receiver.requests:
        payload = Webhook(SECRET).verify(body, headers)
        assert payload["type"] == "job.finished"
        assert payload["data"] == {
            "job_id": job_id,
            "batch_id": None,
            "state": "done",
            "error": None,
        }
    [delivery] = deliveries(hook_settings)
    assert delivery.state == "delivered" and delivery.attempts == 3 and delivery.id in ids
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            receiver.requests[0][1], receiver.requests[0][0]
        )


def test_a_batch_is_reported_once_when_its_last_job_finishes(
    hook_settings: Settings, models: dict[str, Model], receiver: Receiver
) -> None:
    from hepato.gateway.app import create_app

    with TestClient(create_app(hook_settings)) as client:
        paths = images(SAMPLES, "synthetic_*.png")[:3]
        response = client.post(
            "/v1/batches", files=upload(paths), data={"callback_url": receiver.url}
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["batch_id"]
    worker = Worker(hook_settings, models, burst=True)
    worker.run(install_signals=False)
    sweep_until_delivered(worker, receiver)

    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "batch.finished"
    assert payload["data"]["batch_id"] == batch_id and payload["data"]["state"] == "done"
    assert payload["data"]["counts"]["done"] == 3
    assert len(deliveries(hook_settings)) == 1


def test_a_callback_url_is_checked(settings: Settings, hook_settings: Settings) -> None:
    from hepato.gateway.app import create_app

    path = images(SAMPLES, "synthetic_*.png")[0]
    files = {"file": (path.name, path.read_bytes())}
    with TestClient(create_app(hook_settings)) as client:
        for bad in ("ftp://example.org/x", "not a url", "file:///etc/passwd"):
            answer = client.post("/v1/jobs", files=files, data={"callback_url": bad})
            assert answer.status_code == 422, (bad, answer.text)
    with TestClient(create_app(settings)) as client:  # no webhook secret configured
        answer = client.post("/v1/jobs", files=files, data={"callback_url": "http://a.test/"})
        assert answer.status_code == 422 and "HEPATO_WEBHOOK_SECRET" in answer.text
    assert json.loads(answer.text)["detail"]
