"""A thousand watchers on one gateway process (issue 18): 1,000 concurrent event
streams, served by real uvicorn, hold one Redis connection between them (the process's
wake-up hub, gateway.wakeups), and every stream gets every event of its job."""

from __future__ import annotations

import asyncio
import json
import resource
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import aconnect_sse
from sqlalchemy import Engine, event

from hepato.common import claim, event_log, jobs
from hepato.common.constants import PUBLIC_TENANT, Priority
from hepato.common.db import get_engine
from hepato.common.images import ImageInfo
from hepato.common.manifest import load_registry
from hepato.common.results import DetectResult
from hepato.common.settings import Settings
from tests.server import serve

pytestmark = pytest.mark.slow

STREAMS = 1000
# Of them, on one small batch (the rest one job each).
BATCH_STREAMS = 50


def _raise_fd_limit(needed: int) -> None:
    """Each stream is a client socket and an accepted one, both in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "raise `ulimit -Hn`"


def _subscribers(client: redis.Redis) -> list[dict[str, Any]]:
    """The connections in pub/sub mode, whoever opened them."""
    return [c for c in client.client_list() if int(c["sub"]) or int(c["psub"])]


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def _submit(engine: Engine, settings: Settings, n: int) -> jobs.Created:
    image = ImageInfo("png", "image/png", 32, 32, 100)
    return jobs.create(
        engine,
        [jobs.NewJob(f"w{i}.png", f"watch/{uuid.uuid4()}", image) for i in range(n)],
        as_batch=True,
        tenant=PUBLIC_TENANT,
        model=load_registry(settings.models_dir)[settings.default_model],
        priority=Priority.routine,
        max_attempts=1,
        deadline_s=None,
        question=None,
        callback_url=None,
    )


class Watcher:
    """One event stream, read to its end: (event, id, data) of each event."""

    def __init__(self, http: httpx.AsyncClient, path: str) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.first = asyncio.Event()
        self.task = asyncio.create_task(self._read(http, path))

    async def _read(self, http: httpx.AsyncClient, path: str) -> None:
        async with aconnect_sse(http, "GET", path) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                self.events.append((sse.event, sse.id, json.loads(sse.data)))
                self.first.set()

    def job_events(self) -> list[tuple[str, str]]:
        """(job id, state) of each job event; their ids strictly increasing."""
        ids = [event_log.parse_cursor(i) for kind, i, _ in self.events if kind == "job"]
        assert ids == sorted(set(ids)), ids
        return [(d["job_id"], d["state"]) for kind, _, d in self.events if kind == "job"]


def test_1000_streams_hold_one_redis_connection_and_each_gets_its_events(
    settings: Settings,
) -> None:
    _raise_fd_limit(3 * STREAMS + 1000)
    # No interval re-read within the test: every event after a stream's first read
    # reaches it through a Redis wake-up, fanned out by the hub.
    quiet = settings.model_copy(
        update={"events_poll_interval_s": 3600.0, "events_keepalive_s": 3600.0}
    )
    engine = get_engine(settings.database_url)
    # Many channels with one listener each (job streams), and one channel with many
    # (streams of one batch).
    watched = _submit(engine, settings, STREAMS - BATCH_STREAMS)
    shared = _submit(engine, settings, 2)
    everyone = [*watched.job_ids, *shared.job_ids]
    paths = [f"/v1/jobs/{j}/events" for j in watched.job_ids]
    paths += [f"/v1/batches/{shared.batch_id}/events"] * BATCH_STREAMS
    channels = len(watched.job_ids) + 1
    watching = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    reads: list[str] = []

    def count_event_reads(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM job_events" in statement:
            reads.append(statement)

    from hepato.gateway.app import create_app

    async def scenario(base: str) -> tuple[list[Watcher], dict[str, int]]:
        limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
        timeout = httpx.Timeout(30, read=None)  # a stream idles between events
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as http:
            one = Watcher(http, paths[0])
            await asyncio.wait_for(one.first.wait(), 60)
            with_one = len(await asyncio.to_thread(watching.client_list))
            watchers = [one, *(Watcher(http, path) for path in paths[1:])]
            await asyncio.wait_for(asyncio.gather(*(w.first.wait() for w in watchers)), 120)

            def all_subscribed() -> list[dict[str, Any]] | None:
                subscribers = _subscribers(watching)
                return subscribers if sum(int(c["sub"]) for c in subscribers) >= channels else None

            subscribers = await asyncio.to_thread(_wait_for, "every subscription", all_subscribed)
            figures = {
                "clients_with_one_stream": with_one,
                "clients_with_all_streams": len(await asyncio.to_thread(watching.client_list)),
                "pubsub_connections": len(subscribers),
                "channels_on_it": int(subscribers[0]["sub"]),
            }
            event.listen(engine, "before_cursor_execute", count_event_reads)
            try:
                # The real state changes, each one transaction for every job.
                token, taken, _ = await asyncio.to_thread(
                    claim.claim, engine, everyone, "watchers-w1", 600.0
                )
                assert len(taken) == len(everyone)
                results = [
                    jobs.JobResult(j, DetectResult(boxes=[]), batch_size=1, inference_ms=1.0)
                    for j in everyone
                ]
                written = await asyncio.to_thread(jobs.complete, engine, token, results, "v1")
                assert written == set(everyone)
                # A job's stream ends after its terminal event, a batch's after its last.
                await asyncio.wait_for(asyncio.gather(*(w.task for w in watchers)), 300)
            finally:
                event.remove(engine, "before_cursor_execute", count_event_reads)
        return watchers, figures

    with serve(create_app(quiet)) as base:
        watchers, figures = asyncio.run(scenario(base))

    # One connection in pub/sub mode, subscribed to every stream's channel; the other
    # connections do not grow with the streams (999 more streams, no more clients).
    assert figures["pubsub_connections"] == 1, figures
    assert figures["channels_on_it"] == channels, figures
    assert figures["clients_with_all_streams"] <= figures["clients_with_one_stream"], figures
    lifecycle = ("pending", "processing", "done")
    for job_id, w in zip(watched.job_ids, watchers[: len(watched.job_ids)], strict=True):
        assert w.job_events() == [(str(job_id), state) for state in lifecycle]
    for w in watchers[len(watched.job_ids) :]:
        got = w.job_events()
        for job_id in shared.job_ids:
            assert [state for job, state in got if job == str(job_id)] == list(lifecycle)
        assert len(got) == 2 * len(lifecycle)
        kind, _, data = w.events[-1]
        assert kind == "batch" and data["state"] == "done", w.events[-1]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{STREAMS} streams: {figures}; Postgres event reads during 2 state changes: "
        f"{len(reads)}; peak RSS of the test process {peak_mb:.0f} MB"
    )
