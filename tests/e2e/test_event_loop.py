"""No blocking call on the gateway's event loop: every Postgres statement (and pool
checkout, whose pre-ping is one), every sync Redis command and every object-store
request the gateway makes while serving the public routes runs in a worker thread, never
in the thread that runs the loop. (The SSE streams use redis.asyncio, which is not
watched here: it awaits.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import urllib3
from fastapi.testclient import TestClient

from hepato.common import tenants
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.gateway.app import create_app
from hepato.worker.backends.base import Model
from hepato.worker.runner import Worker
from tests.e2e.test_pipeline import thirty_two, upload
from tests.listen import listening

pytestmark = pytest.mark.slow


def on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def blocking_on_loop(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The blocking calls made in a thread that is running an event loop."""
    found: list[str] = []

    def note(what: str) -> None:
        if on_a_loop():
            found.append(f"{what} in {threading.current_thread().name}")

    def wrap(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
            note(f"{cls.__module__}.{cls.__name__}.{name}{args[:2]!r}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, watched)

    wrap(redis.connection.AbstractConnection, "send_packed_command")
    wrap(urllib3.PoolManager, "urlopen")  # the object store client's HTTP
    engine = get_engine(settings.database_url)

    def on_execute(conn: Any, cursor: Any, sql: str, *_: Any) -> None:
        note(f"SQL {sql[:60]!r}")

    def on_checkout(*_: Any) -> None:
        note("pool checkout (pre-ping)")

    hooks: list[tuple[Any, str, Callable[..., None]]] = [
        (engine, "before_cursor_execute", on_execute),
        (engine.pool, "checkout", on_checkout),
    ]
    with listening(hooks):
        yield found


def test_no_route_blocks_the_event_loop(
    settings: Settings, models: dict[str, Model], blocking_on_loop: list[str]
) -> None:
    key = tenants.create_key(get_engine(settings.database_url), "loop").key
    auth = {"Authorization": f"Bearer {key}"}
    required = settings.model_copy(update={"auth": "required"})
    worker = Worker(settings, models)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    with TestClient(create_app(required), headers=auth) as client:
        thread.start()
        try:
            paths = thirty_two()[:3]
            batch = client.post(
                "/v1/batches", files=upload(paths), headers={"Idempotency-Key": "loop-1"}
            )
            assert batch.status_code == 202, batch.text
            again = client.post(
                "/v1/batches", files=upload(paths), headers={"Idempotency-Key": "loop-1"}
            )
            assert again.headers.get("Idempotent-Replayed") == "true"
            one = client.post("/v1/jobs", files={"file": (paths[0].name, paths[0].read_bytes())})
            assert one.status_code == 202, one.text
            detect = client.post("/v1/detect", files={"file": ("d.png", paths[1].read_bytes())})
            assert detect.status_code == 200, detect.text
        finally:
            worker.stopping.set()
            thread.join(timeout=30)
        bid, jid = batch.json()["batch_id"], detect.json()["job_id"]
        for url in (
            f"/v1/batches/{bid}",
            f"/v1/batches/{bid}/export?format=csv",
            f"/v1/batches/{bid}/events",  # finished: the stream ends after its events
            f"/v1/jobs/{jid}",
            f"/v1/jobs/{jid}/image",
            f"/v1/jobs/{jid}/image_url",
            f"/v1/jobs/{jid}/export",
            "/v1/models",
            "/readyz",
        ):
            response = client.get(url)
            assert response.status_code == 200, (url, response.text)
        assert client.post("/v1/jobs", files={"file": ("x.png", b"")}).status_code == 422
    assert blocking_on_loop == []


def test_a_submission_goes_to_the_thread_pool_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its storing and recording, and nothing else: FastAPI runs a plain ``def``
    dependency in its thread pool, a hand-off each way per request for a function that
    only reads an attribute."""
    import anyio.to_thread

    real, calls = anyio.to_thread.run_sync, list[str]()

    async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(func, "func", func).__name__)  # functools.partial: its function
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    image = thirty_two()[0].read_bytes()
    for path in ("/v1/jobs", "/v1/batches"):
        calls.clear()
        field = "file" if path == "/v1/jobs" else "files"
        response = client.post(path, files={field: ("a.png", image)}, data={"priority": "urgent"})
        assert response.status_code == 202, response.text
        assert calls == ["submit"], (path, calls)
