"""The Python client and the ``hepato submit | status | results`` commands against a real
gateway (uvicorn on a free port, API keys required) and a worker thread on the real
services. What a healthy gateway never does is in test_client_stubs.py."""

from __future__ import annotations

import csv
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from hepato.cli.main import app as cli_app
from hepato.client import (
    AsyncHepatoClient,
    BatchEvent,
    HepatoAPIError,
    HepatoClient,
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
from tests.e2e.conftest import image_dir
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
    assert all(isinstance(i, str) and i for i in ids)
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
