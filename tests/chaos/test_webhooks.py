"""Chaos, webhooks (issue 12, item 1): a hostile receiver and a malformed callback cannot
hold up recovery or the other deliveries. A real worker process, real services, and a
receiver on loopback that answers one byte a second and never finishes."""

from __future__ import annotations

import base64
import json
import select as socket_select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job, WebhookDelivery
from hepato.worker.webhook_sender import WebhookSender
from tests.chaos.conftest import judge, wait_for
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_pipeline import db_jobs, submit
from tests.e2e.test_webhooks import Receiver, receiver  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"hepato-chaos-webhook-secret-32by").decode()
# The receivers of these tests listen on loopback, which callbacks may reach only when
# listed; the attempt deadline is short so a cut attempt is seen within the test.
HOOK_ENV = {
    "HEPATO_WEBHOOK_SECRET": SECRET,
    "HEPATO_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
    "HEPATO_WEBHOOK_TIMEOUT_S": "2",
}


@dataclass
class Trickler:
    """Accepts every connection and sends a never-ending HTTP answer, one byte a
    second: each read returns within any per-read timeout, the answer never ends."""

    url: str = ""
    opened: list[float] = field(default_factory=list)
    closed: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    state = Trickler()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    state.url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    answer = b"HTTP/1.1 200 OK\r\n" + b"x-slow: " + b"." * 100_000

    def trickle(conn: socket.socket) -> None:
        state.opened.append(time.monotonic())
        with conn:
            next_byte = time.monotonic() + 1.0
            for byte in answer:
                # Read (and drop) the request meanwhile: an end of file is the client
                # giving up, seen at once rather than at the next send.
                while (left := next_byte - time.monotonic()) > 0:
                    readable, _, _ = socket_select.select([conn], [], [], min(left, 0.1))
                    if state.stop.is_set():
                        return
                    if readable and not _recv(conn):
                        state.closed.append(time.monotonic())
                        return
                next_byte += 1.0
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    state.closed.append(time.monotonic())
                    return

    def serve() -> None:
        while not state.stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    yield state
    state.stop.set()
    server.join(5)
    listener.close()


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except OSError:
        return b""


def add_delivery(settings: Settings, delivery_id: str, url: str) -> None:
    """A due webhook of the open mode's tenant, as a finished job would leave it."""
    body = json.dumps({"type": "job.finished", "timestamp": "t", "data": {"id": delivery_id}})
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_deliveries (id, tenant, url, body, state, attempts) "
                "VALUES (:id, 'public', :url, :body, 'pending', 0)"
            ),
            {"id": delivery_id, "url": url, "body": body},
        )


def delivery_rows(settings: Settings) -> dict[str, Any]:
    with get_engine(settings.database_url).connect() as conn:
        return {r.id: r for r in conn.execute(select(WebhookDelivery))}


# --- 1. a receiver that trickles its answer, while a dead worker's leases run out --------
def test_a_trickling_receiver_does_not_delay_recovery_of_a_dead_workers_jobs(
    client: TestClient, settings: Settings, spawn_worker, completions, trickler: Trickler
) -> None:
    synthetic = images(SAMPLES, "synthetic_*.png")
    ids = [
        j["job_id"]
        for j in submit(client, [synthetic[i % len(synthetic)] for i in range(8)])["jobs"]
    ]
    engine = get_engine(settings.database_url)
    # A worker that died holding every job: claimed, its lease not yet run out. The ids
    # it popped may still be in Redis; the rescuer pops them and drops them at claim.
    with engine.begin() as conn:
        conn.execute(
            update(Job).values(
                state="processing",
                attempts=1,
                worker_id="dead",
                lease_token=text("gen_random_uuid()"),
                lease_until=text("now() + interval '1 hour'"),
                started_at=text("now()"),
            )
        )
    add_delivery(settings, "msg_trickle", trickler.url)
    rescuer = spawn_worker("rescuer", **HOOK_ENV)
    rescuer.wait_ready(settings.redis_url)
    wait_for("the webhook attempt to reach the trickling receiver", lambda: trickler.opened, 30)
    # Only now do the dead worker's leases run out: its jobs come back only through the
    # rescuer's sweeper, while a delivery to the trickler is in flight.
    with engine.begin() as conn:
        conn.execute(update(Job).values(lease_until=text("now() - interval '1 second'")))
    lapsed = time.monotonic()

    def all_done() -> bool:
        return all(j.state == "done" for j in db_jobs(settings))

    wait_for("the dead worker's jobs to be done", all_done, 30, every_s=0.1)
    recovered_in = time.monotonic() - lapsed
    # The attempt itself was cut at its total deadline (2 s), however often bytes came.
    wait_for("the trickling attempt to be cut", lambda: trickler.closed, 10, every_s=0.1)
    held = trickler.closed[0] - trickler.opened[0]
    assert held < 2 + 1.5, f"the attempt lasted {held:.1f} s"
    # The receiver sees the connection cut before the worker records why: wait for it.
    error = wait_for(
        "the cut attempt's error to be recorded",
        lambda: delivery_rows(settings)["msg_trickle"].last_error,
        10,
        every_s=0.1,
    )
    assert "2 s" in error, error
    judge(
        settings,
        "webhook receiver trickling 1 byte/s while a dead worker's leases run out",
        ids,
        completions,
        recovered_s=round(recovered_in, 1),
        attempt_cut_after_s=round(held, 1),
    )
    assert recovered_in < 15


# --- 2. one malformed callback in a round of good ones ---------------------------------
def test_an_invalid_callback_url_fails_alone_and_the_others_are_delivered_once(
    settings: Settings,
    spawn_worker,
    receiver: Receiver,  # noqa: F811
) -> None:
    good = ["msg_good_1", "msg_good_2", "msg_good_3"]
    for delivery_id in good:
        add_delivery(settings, delivery_id, receiver.url)
    # Longer than httpx accepts: httpx raises InvalidURL, not an HTTPError, which once
    # ended the whole round, so the others were sent again and again.
    add_delivery(settings, "msg_too_long", "http://127.0.0.1/" + "x" * 70_000)
    spawn_worker("sender", **HOOK_ENV)

    def settled() -> dict[str, Any] | None:
        rows = delivery_rows(settings)
        return rows if all(r.state != "pending" for r in rows.values()) else None

    rows = wait_for("every delivery to settle", settled, 60, every_s=0.1)
    bad = rows.pop("msg_too_long")
    assert (bad.state, bad.attempts) == ("failed", 1), bad
    assert "longer than" in (bad.last_error or ""), bad.last_error
    assert {r.id: (r.state, r.attempts) for r in rows.values()} == {
        i: ("delivered", 1) for i in good
    }
    # Settled rows are never sent again: each good webhook reached the receiver once.
    sent = sorted(headers["webhook-id"] for headers, _ in receiver.requests)
    assert sent == good


# --- 3. a delivery whose last attempt's worker died mid-send ---------------------------
def test_a_delivery_out_of_attempts_is_failed_not_sent_again(
    settings: Settings,
    receiver: Receiver,  # noqa: F811
) -> None:
    hook = settings.model_copy(
        update={"webhook_secret": SECRET, "webhook_allowed_hosts": ["127.0.0.1"]}
    )
    add_delivery(settings, "msg_spent", receiver.url)
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(
            update(WebhookDelivery).values(
                attempts=hook.webhook_max_attempts, last_error="HTTP 500"
            )
        )
    assert WebhookSender(hook, get_engine(settings.database_url)).deliver_once() == 0
    spent = delivery_rows(settings)["msg_spent"]
    assert (spent.state, spent.attempts) == ("failed", hook.webhook_max_attempts)
    assert spent.last_error.startswith("HTTP 500"), spent.last_error
    assert receiver.requests == []
