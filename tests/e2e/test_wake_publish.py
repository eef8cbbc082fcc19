"""A submission's wake-ups (common.wake_publish) go to Redis with the push of its ids, in
the one round trip after its commit; readers of its events are woken all the same. Real
Postgres and Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from hepato.common.constants import batch_events_channel, job_events_channel
from hepato.common.settings import Settings
from tests.e2e.test_pipeline import thirty_two

pytestmark = pytest.mark.slow


def woken(pubsub: Any, channel: str, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "pmessage" and message["channel"] == channel.encode():
            return True
    return False


def test_a_submission_wakes_its_readers_in_the_round_trip_of_its_push(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = redis.Redis.from_url(settings.redis_url).pubsub()
    listener.psubscribe(f"{job_events_channel('*')}", f"{batch_events_channel('*')}")
    assert listener.get_message(timeout=5)  # the subscription's confirmation
    assert listener.get_message(timeout=5)
    sent: list[list[bytes]] = []
    gateway = client.app.state.resources.redis  # type: ignore[attr-defined]
    original = gateway.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            sent.append([command[0][0] for command in pipe.command_stack])
            return execute(*a, **k)

        pipe.execute = counted
        return pipe

    monkeypatch.setattr(gateway, "pipeline", pipeline)
    image = thirty_two()[0].read_bytes()
    one = client.post("/v1/jobs", files={"file": ("a.png", image)})
    assert one.status_code == 202, one.text
    assert woken(listener, job_events_channel(one.json()["job_id"]))
    batch = client.post("/v1/batches", files=[("files", ("b.png", image))])
    assert batch.status_code == 202, batch.text
    assert woken(listener, batch_events_channel(batch.json()["batch_id"]))
    # One pipeline per submission, its push and its wake-ups together.
    assert len(sent) == 2 and all("RPUSH" in s and "PUBLISH" in s for s in sent), sent
