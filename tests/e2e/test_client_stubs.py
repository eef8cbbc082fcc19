"""The Python client against small stub apps served like the real gateway (uvicorn on a
free port), for what a healthy gateway never does: answer 503 or 429, drop an event
stream, lack the events endpoint; and uploads streamed from disk."""

from __future__ import annotations

import itertools
import json
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hepato.client import BatchEvent, HepatoAPIError, HepatoClient, HepatoClientError
from tests.e2e.conftest import image_dir
from tests.server import serve

pytestmark = pytest.mark.slow


def accepted_body(n: int) -> dict[str, Any]:
    batch_id = uuid.uuid4()
    jobs = [
        {"job_id": str(uuid.uuid4()), "filename": f"f{i}.png", "status_url": "http://x/j"}
        for i in range(n)
    ]
    return {
        "batch_id": str(batch_id),
        "status_url": f"http://x/v1/batches/{batch_id}",
        "model": "stub",
        "priority": "routine",
        "accepted": n,
        "jobs": jobs,
        "rejected": [],
    }


def test_429_and_503_are_retried_after_retry_after_with_one_idempotency_key(
    tmp_path: Path,
) -> None:
    seen: list[tuple[str | None, int]] = []
    answers = [(503, "1"), (429, "1")]

    async def batches(request: Request) -> Response:
        body = await request.body()
        seen.append((request.headers.get("idempotency-key"), len(body)))
        if answers:
            code, after = answers.pop(0)
            return JSONResponse({"detail": "busy"}, code, headers={"Retry-After": after})
        return JSONResponse(accepted_body(2), 202)

    folder = image_dir(tmp_path, 2)
    with serve(Starlette(routes=[Route("/v1/batches", batches, methods=["POST"])])) as url:
        started = time.monotonic()
        with HepatoClient(url, "k", backoff_s=0.01) as client:
            refs = client.submit(folder)
        elapsed = time.monotonic() - started

    assert len(refs) == 1 and refs[0].accepted == 2
    assert len(seen) == 3
    assert len({k for k, _ in seen}) == 1 and seen[0][0], "every retry carries the same key"
    assert len({n for _, n in seen}) == 1, "each retry sends the files again, whole"
    assert elapsed >= 2.0, "waited Retry-After (1 s) twice, not its own 10 ms backoff"


def test_retries_are_bounded(tmp_path: Path) -> None:
    calls = 0

    async def down(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return JSONResponse({"detail": "down"}, 503, headers={"Retry-After": "0"})

    with (
        serve(Starlette(routes=[Route("/v1/batches/{bid}", down)])) as url,
        HepatoClient(url, "k", retries=2) as client,
        pytest.raises(HepatoAPIError) as raised,
    ):
        client.batch(uuid.uuid4())
    assert raised.value.status_code == 503 and raised.value.detail == "down"
    assert calls == 3


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def job_event(n: int, batch_id: uuid.UUID, state: str = "done") -> bytes:
    data = {
        "job_id": str(uuid.UUID(int=n)),
        "batch_id": str(batch_id),
        "state": state,
        "error": None,
        "at": datetime.now(UTC).isoformat(),
    }
    return sse("job", data, n)


def test_a_dropped_event_stream_resumes_after_the_last_event_id() -> None:
    batch_id = uuid.uuid4()
    asked: list[str | None] = []

    async def stream(request: Request) -> Response:
        last = request.headers.get("last-event-id")
        asked.append(last)

        async def body() -> Any:
            yield b": keep-alive\n\n"
            if last is None:  # first connection: two events, then the connection drops
                yield job_event(1, batch_id, "processing")
                yield job_event(2, batch_id)
                return
            for n in range(int(last) + 1, 4):
                yield job_event(n, batch_id)
            counts = {"done": 3}
            yield sse("batch", {"batch_id": str(batch_id), "state": "done", "counts": counts})

        return StreamingResponse(body(), media_type="text/event-stream")

    with (
        serve(Starlette(routes=[Route("/v1/batches/{bid}/events", stream)])) as url,
        HepatoClient(url, "k", backoff_s=0.01) as client,
    ):
        events = list(client.events(batch_id))
    assert asked == [None, "2"]
    # SSE keeps the last id for an event that names none, as the closing batch event.
    assert [e.event_id for e in events] == ["1", "2", "3", "3"]
    assert isinstance(events[-1], BatchEvent) and events[-1].counts == {"done": 3}
    assert [e.state for e in events[:3]] == ["processing", "done", "done"]


def batch_out(batch_id: uuid.UUID, counts: dict[str, int]) -> dict[str, Any]:
    unfinished = counts.get("pending", 0) + counts.get("processing", 0)
    return {
        "id": str(batch_id),
        "state": "processing" if unfinished else "done",
        "model": "stub",
        "priority": "routine",
        "total": sum(counts.values()),
        "counts": counts,
        "created_at": datetime.now(UTC).isoformat(),
        "page": 1,
        "page_size": 1,
        "jobs": [],
        "next_page_url": None,
    }


def test_wait_polls_with_backoff_where_there_are_no_events() -> None:
    batch_id = uuid.uuid4()
    progress = [*[{"pending": 2}] * 5, {"processing": 1, "done": 1}, {"done": 2}]
    polled: list[float] = []

    async def get_batch(request: Request) -> Response:
        polled.append(time.monotonic())
        counts = progress.pop(0) if len(progress) > 1 else progress[0]
        return JSONResponse(batch_out(batch_id, counts))

    routes = [Route("/v1/batches/{bid}", get_batch)]  # no events route: 404
    seen: list[Any] = []
    with serve(Starlette(routes=routes)) as url, HepatoClient(url, "k") as client:
        final = client.wait(batch_id, seen.append, timeout=30)
    assert final.state == "done"
    assert all(isinstance(e, BatchEvent) for e in seen)
    assert [e.counts for e in seen] == [{"pending": 2}, {"processing": 1, "done": 1}, {"done": 2}]
    gaps = [b - a for a, b in itertools.pairwise(polled)]
    assert gaps[3] > gaps[0] * 2, "the interval grows while nothing changes"


class Drain:
    """An upload endpoint that reads the body piece by piece and keeps none of it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str | None, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        received, more = 0, True
        while more:
            message = await receive()
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        headers = dict(scope["headers"])
        key = headers.get(b"idempotency-key")
        self.requests.append((key.decode() if key else None, received))
        await JSONResponse(accepted_body(1), 202)(scope, receive, send)


def test_uploads_are_streamed_from_disk_never_read_whole(tmp_path: Path) -> None:
    size, count = 4 * 1024 * 1024, 20
    folder = tmp_path / "big"
    folder.mkdir()
    noise = bytearray(size)
    for i in range(count):
        # The PNG signature and then bytes unlike any other file's: 80 MB in all.
        noise[:16] = b"\x89PNG\r\n\x1a\n" + i.to_bytes(8, "big")
        (folder / f"big_{i:02d}.png").write_bytes(noise)
    del noise
    drain = Drain()
    with serve(drain) as url, HepatoClient(url, "k") as client:
        tracemalloc.start()
        try:
            refs = client.submit(folder, batch_size=8)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(refs) == 3 and len(drain.requests) == 3
    assert len({k for k, _ in drain.requests}) == 3, "one Idempotency-Key per request"
    assert sum(n for _, n in drain.requests) > size * count
    # 80 MB went through this process (client and server; about 1.5 MB is the peak of
    # 64 KiB chunks in flight and of the first call's imports): never one whole file.
    assert peak < size, f"peak {peak / 1e6:.1f} MB while uploading 4 MB files"


def test_a_directory_with_no_images_is_an_error_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with (
        HepatoClient("http://127.0.0.1:9", "k") as client,
        pytest.raises(HepatoClientError, match="no image files") as raised,
    ):
        client.submit(tmp_path)
    assert type(raised.value) is HepatoClientError  # not a connection error: nothing was sent
