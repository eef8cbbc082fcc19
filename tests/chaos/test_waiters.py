"""Thousands of callers waiting on ``/v1/predict`` (issue 12, item 3): a waiter costs the
gateway no thread and no connection of its own, so while 2,000 of them wait on one
gateway process its health check and a job lookup still answer at once, and every
waiter gets its result once a worker runs."""

from __future__ import annotations

import asyncio
import io
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from hepato.common import tenants
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job
from tests.chaos.conftest import Spawned, judge, wait_for
from tests.conftest import REPO

pytestmark = pytest.mark.slow

WAITERS = 2000
# What a liveness probe and a status poll may take while the waiters wait.
ANSWER_WITHIN_S = 0.2
PROBES = 30


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 160)).save(out, format="PNG")
    return out.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_fd_limit(needed: int) -> None:
    """Each waiter is a client socket in this process and an accepted one in the
    gateway, which inherits this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "raise `ulimit -Hn`"


@pytest.fixture
def gateway(worker_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``hepato gateway`` (the CLI, one uvicorn process) on a free port, keys required,
    with a detect timeout that outlasts the test."""
    _raise_fd_limit(3 * WAITERS + 1000)
    port = _free_port()
    log = tmp_path / "gateway.log"
    env = {
        **worker_env,
        "HEPATO_AUTH": "required",
        "HEPATO_DETECT_TIMEOUT_S": "600",
        "HEPATO_MAX_QUEUED_PER_MODEL": str(10 * WAITERS),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hepato", "gateway", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"gateway exited:\n{log.read_text(errors='replace')}"
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for("the gateway to listen", up, 60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _timed(client: httpx.AsyncClient, path: str) -> float:
    """Seconds to the answer; the client's timeout when none came (a frozen gateway)."""
    started = time.perf_counter()
    try:
        response = await client.get(path)
    except httpx.TimeoutException:
        return time.perf_counter() - started
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return took


async def _waiting(client: httpx.AsyncClient) -> int:
    """The gateway's count of callers waiting on /v1/predict for an accepted job."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "hepato_predict_waiting":
            return int(family.samples[0].value)
    raise AssertionError("the gateway's /metrics has no hepato_predict_waiting")


def test_2000_waiting_predicts_leave_the_gateway_responsive(
    settings: Settings,
    gateway: str,
    spawn_worker: Callable[..., Spawned],
    completions: Callable[[], dict],
) -> None:
    engine = get_engine(settings.database_url)
    key = tenants.create_key(engine, "waiters").key
    headers = {"Authorization": f"Bearer {key}"}
    png = _png()

    def created() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Job)).scalar_one())

    async def scenario() -> tuple[list[httpx.Response], list[float], list[float]]:
        limits = httpx.Limits(max_connections=WAITERS + 100, max_keepalive_connections=WAITERS)
        async with (
            httpx.AsyncClient(
                base_url=gateway, headers=headers, limits=limits, timeout=700
            ) as waiting,
            httpx.AsyncClient(base_url=gateway, headers=headers, timeout=5) as probe,
        ):
            predicts = [
                asyncio.create_task(
                    waiting.post(
                        "/v1/predict",
                        files={"file": (f"w{i}.png", png, "image/png")},
                        data={"model": "null"},
                    )
                )
                for i in range(WAITERS)
            ]
            # Every job committed and its caller waiting, as the gateway counts them: from
            # here on each predict only waits (no worker yet). Until then the gateway is
            # still taking the 2,000 uploads in, which is not what this test measures.
            deadline = time.monotonic() + 300
            while (n := await asyncio.to_thread(created)) < WAITERS:
                done = [t for t in predicts if t.done()]
                assert not done, f"a predict answered before any worker ran: {done[0].result()}"
                assert time.monotonic() < deadline, f"only {n} of {WAITERS} jobs created"
                await asyncio.sleep(0.2)
            while (n := await _waiting(waiting)) < WAITERS:
                assert time.monotonic() < deadline, f"only {n} of {WAITERS} callers waiting"
                await asyncio.sleep(0.2)
            with engine.connect() as conn:
                one = conn.execute(select(Job.id).limit(1)).scalar_one()
            health: list[float] = []
            lookup: list[float] = []
            for _ in range(PROBES):
                health.append(await _timed(probe, "/healthz"))
                assert health[-1] < ANSWER_WITHIN_S, f"/healthz took {health[-1]:.3f}s"
                lookup.append(await _timed(probe, f"/v1/jobs/{one}"))
                assert lookup[-1] < ANSWER_WITHIN_S, f"GET /v1/jobs/{{id}} took {lookup[-1]:.3f}s"
                await asyncio.sleep(0.1)
            print(
                f"while {WAITERS} predicts waited: /healthz max {max(health) * 1000:.0f} ms, "
                f"GET /v1/jobs/{{id}} max {max(lookup) * 1000:.0f} ms"
            )
            assert not any(t.done() for t in predicts), "every predict is still waiting"
            spawn_worker("waiters-0", HEPATO_WORKER_MODELS='["null"]')
            answers = await asyncio.wait_for(asyncio.gather(*predicts), timeout=600)
            return answers, health, lookup

    answers, health, lookup = asyncio.run(scenario())
    bad = [r for r in answers if r.status_code != 200]
    assert not bad, f"{len(bad)} waiters not answered with a result: {bad[0].text}"
    accepted = [r.json()["job_id"] for r in answers]
    assert len(set(accepted)) == WAITERS
    judge(
        settings,
        f"{WAITERS} /v1/predict callers waiting on one gateway",
        accepted,
        completions,
        healthz_max_ms=round(max(health) * 1000),
        lookup_max_ms=round(max(lookup) * 1000),
    )
