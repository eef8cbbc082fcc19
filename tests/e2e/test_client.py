"""The Python client and the ``hepato submit | status | results`` commands: against a real
gateway (uvicorn on a free port, API keys required) and a worker thread on the real
services, and, for what a healthy gateway never does (answer 503 or 429, drop an event
stream, lack the events endpoint), against small stub apps served the same way."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from typer.testing import CliRunner

from hepato.cli.main import app as cli_app
from hepato.client.client import (
    AsyncHepatoClient,
    BatchEvent,
    HepatoAPIError,
    HepatoClient,
    HepatoClientError,
    HepatoConnectionError,
    JobEvent,
    JobOut,
)
from hepato.common.db import get_engine, session_factory
from hepato.common.results import DetectResult
from hepato.common.settings import Settings
from hepato.common.tables import Batch
from hepato.common.tenants import create_key
from hepato.worker.backends.base import Model
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.server import serve

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway(settings: Settings) -> Iterator[tuple[str, str]]:
    """A real gateway that requires keys, and a key of tenant ``lab-a``: (url, key)."""
    from hepato.gateway.app import create_app

    key = create_key(get_engine(settings.database_url), "lab-a").key
    with serve(create_app(settings.model_copy(update={"auth": "required"}))) as url:
        yield url, key


@pytest.fixture
def worker(settings: Settings, models: dict[str, Model]) -> Iterator[None]:
    """A worker serving the default model in a thread, for the test's whole length."""
    from hepato.worker.runner import Worker

    running = Worker(settings, models)
    thread = threading.Thread(target=running.run, kwargs={"install_signals": False})
    thread.start()
    try:
        yield
    finally:
        running.stopping.set()
        thread.join(timeout=30)


def image_dir(root: Path, n: int) -> Path:
    """``n`` PNG copies of the synthetic samples, some in a subfolder, and a file that
    is not an image by its name (skipped by the walk)."""
    synthetic = images(SAMPLES, "synthetic_*.png")
    folder = root / "images"
    (folder / "more").mkdir(parents=True)
    for i in range(n):
        where = folder / "more" if i % 3 == 0 else folder
        shutil.copy(synthetic[i % len(synthetic)], where / f"tile_{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def batches_in_db(settings: Settings) -> int:
    with session_factory(settings.database_url)() as session:
        return int(session.scalar(select(func.count()).select_from(Batch)) or 0)


# --- against the real gateway -----------------------------------------------------------


def test_submit_a_directory_wait_on_events_and_read_typed_results(
    gateway: tuple[str, str], worker: None, settings: Settings, tmp_path: Path
) -> None:
    url, key = gateway
    folder = image_dir(tmp_path, 30)
    uploaded: list[Path] = []
    with HepatoClient(url, key) as client:
        refs = client.submit(folder, batch_size=8, on_uploaded=uploaded.append)
        assert [r.accepted for r in refs] == [8, 8, 8, 6]
        assert all(not r.rejected for r in refs)
        assert sorted(uploaded) == sorted(folder.rglob("*.png"))
        events: list[JobEvent | BatchEvent] = []
        finals = [client.wait(r.batch_id, events.append, timeout=60) for r in refs]
        jobs = [job for r in refs for job in client.results(r.batch_id, page_size=5)]

    assert batches_in_db(settings) == 4, "one batch per request, none submitted twice"
    assert all(b.state == "done" and b.counts["done"] == b.total for b in finals)
    # The events stream, not the polling fallback: job events, then one batch event each.
    job_events = [e for e in events if isinstance(e, JobEvent)]
    closing = [e for e in events if isinstance(e, BatchEvent)]
    assert {r.batch_id for r in refs} == {e.batch_id for e in closing}
    accepted = {r.batch_id: r.accepted for r in refs}
    assert all(e.state == "done" and e.counts["done"] == accepted[e.batch_id] for e in closing)
    done = {e.job_id for e in job_events if e.state == "done"}
    assert done == {j.job_id for r in refs for j in r.jobs}
    ids = [e.event_id for e in job_events]
    assert all(isinstance(i, int) for i in ids)
    # Five pages of five per batch of eight or six, read to the end, each job once.
    assert len(jobs) == 30 and len({j.id for j in jobs}) == 30
    assert all(isinstance(j, JobOut) and j.state == "done" for j in jobs)
    assert all(isinstance(j.result, DetectResult) for j in jobs)
    assert {j.filename for j in jobs} == {p.name for p in folder.rglob("*.png")}
    assert sum(len(j.result.boxes) for j in jobs if isinstance(j.result, DetectResult)) > 0

    async def one_job() -> JobOut:
        async with AsyncHepatoClient(url, key) as aclient:
            return await aclient.job(jobs[0].id)

    assert anyio.run(one_job) == jobs[0]


def test_keys_and_errors_are_typed(gateway: tuple[str, str], tmp_path: Path) -> None:
    url, key = gateway
    with HepatoClient(url, "hpk_not-a-key") as client:
        with pytest.raises(HepatoAPIError) as refused:
            client.batch(uuid.uuid4())
        assert refused.value.status_code == 401
    with HepatoClient(url, key) as client:
        with pytest.raises(HepatoAPIError) as missing:
            client.batch(uuid.uuid4())
        assert missing.value.status_code == 404
        bad = tmp_path / "bad.png"
        bad.write_text("<html>not an image</html>")
        with pytest.raises(HepatoAPIError) as nothing:
            client.submit([bad])
        assert nothing.value.status_code == 422 and nothing.value.submitted == []
    with (
        HepatoClient("http://127.0.0.1:9", key, retries=2, backoff_s=0.01) as client,
        pytest.raises(HepatoConnectionError),
    ):
        client.batch(uuid.uuid4())


def test_cli_submit_wait_status_and_csv_results(
    gateway: tuple[str, str], worker: None, tmp_path: Path
) -> None:
    url, key = gateway
    folder = image_dir(tmp_path, 10)
    runner = CliRunner()
    auth = ["--url", url, "--api-key", key]

    submitted = runner.invoke(
        cli_app,
        [
            "submit",
            str(folder),
            "--model",
            "hepato-yolov8n",
            "--batch-size",
            "4",
            "--wait",
            *auth,
        ],
    )
    assert submitted.exit_code == 0, submitted.output
    lines = [ln for ln in submitted.stdout.splitlines() if "accepted" in ln]
    assert [ln.split("\t")[1] for ln in lines] == ["4 accepted", "4 accepted", "2 accepted"]
    assert "10 jobs: 10 done" in submitted.stdout
    assert "uploaded" in submitted.stderr and "images/s" in submitted.stderr
    batch_id = lines[0].split("\t")[0]

    status = runner.invoke(cli_app, ["status", batch_id, *auth])
    assert status.exit_code == 0, status.output
    assert f"batch {batch_id}: done (4 jobs" in status.stdout

    out = tmp_path / "boxes.csv"
    results = runner.invoke(
        cli_app, ["results", batch_id, "--format", "csv", "--out", str(out), *auth]
    )
    assert results.exit_code == 0, results.output
    rows = list(csv.DictReader(out.open()))
    assert rows and {r["job_id"] for r in rows} <= {str(j) for j in _job_ids(url, key, batch_id)}
    assert not out.with_name("boxes.csv.part").exists()

    # A file the gateway refuses by name: the rest is done, the exit code says 1.
    (folder / "more" / "fake.png").write_text("<svg/>")
    partly = runner.invoke(cli_app, ["submit", str(folder / "more"), "--wait", *auth])
    assert partly.exit_code == 1, partly.output
    assert "refused fake.png" in partly.stderr

    # Usage and connection errors: 2, with one clear line.
    assert runner.invoke(cli_app, ["submit", str(tmp_path / "nowhere"), *auth]).exit_code == 2
    down = runner.invoke(cli_app, ["status", batch_id, "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 2 and "error:" in down.stderr
    unknown = runner.invoke(cli_app, ["status", str(uuid.uuid4()), *auth])
    assert unknown.exit_code == 2 and "404" in unknown.stderr


def _job_ids(url: str, key: str, batch_id: str) -> list[uuid.UUID]:
    with HepatoClient(url, key) as client:
        return [j.id for j in client.results(batch_id)]


# --- against stubs ---------------------------------------------------------------------


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
    assert [e.event_id for e in events] == [1, 2, 3, 3]
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
