"""Smaller faults of issue 12, item 10, on the real services: an object store (or a proxy
in front of it) answering garbage is a 503 like any store outage, never a 500; a
connection lost during COMMIT does not let an Idempotency-Key retry create the jobs
twice; a worker whose lease was taken does not count jobs it could not fail as failed."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job
from hepato.worker.backends.base import Model
from tests.chaos import steal_lease
from tests.chaos.conftest import judge
from tests.chaos.cut_commit import CommitCutter
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow

PNG = SAMPLES / "synthetic_00.png"


def one(name: str = "a.png") -> dict[str, tuple[str, bytes, str]]:
    return {"file": (name, PNG.read_bytes(), "image/png")}


def job_count(settings: Settings) -> int:
    with get_engine(settings.database_url).connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Job)).scalar_one())


class _Gateway504(BaseHTTPRequestHandler):
    """What a proxy in front of a restarting store answers: an HTML error page."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"
        self.send_response(504)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def broken_store() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway504)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_store_answering_garbage_is_a_503_never_a_500(
    settings: Settings, client: TestClient, broken_store: str
) -> None:
    from hepato.gateway.app import create_app

    stored = client.post("/v1/jobs", files=one())
    assert stored.status_code == 202
    job_id = stored.json()["job_id"]
    app = create_app(settings.model_copy(update={"s3_endpoint": broken_store}))
    with TestClient(app, raise_server_exceptions=False) as broken:
        # minio raises InvalidResponseError for a non-XML answer (not an S3Error).
        upload = broken.post("/v1/jobs", files=one("b.png"))
        image = broken.get(f"/v1/jobs/{job_id}/image")
    for response in (upload, image):
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
        assert "object store" in response.json()["detail"]
    assert job_count(settings) == 1, "nothing of the refused upload was kept"


@pytest.fixture
def cutter(settings: Settings) -> Iterator[CommitCutter]:
    url = make_url(settings.database_url)
    socket_dir = url.query.get("host")
    port = int(url.port or url.query.get("port") or 5432)  # type: ignore[arg-type]
    # The local stack's Postgres listens on a unix socket only.
    if isinstance(socket_dir, str) and socket_dir.startswith("/"):
        proxy = CommitCutter(f"{socket_dir}/.s.PGSQL.{port}")
    else:
        proxy = CommitCutter((url.host or "127.0.0.1", port))
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_commit_cut_mid_way_does_not_free_the_idempotency_key(
    settings: Settings, cutter: CommitCutter
) -> None:
    from hepato.gateway.app import create_app

    url = (
        make_url(settings.database_url)
        .difference_update_query(["host", "port"])
        .set(host="127.0.0.1", port=cutter.port)
    )
    cut = settings.model_copy(update={"database_url": url.render_as_string(hide_password=False)})
    headers = {"Idempotency-Key": "cut-" + uuid.uuid4().hex}
    with TestClient(create_app(cut), raise_server_exceptions=False) as client:
        cutter.armed.set()
        first = client.post("/v1/jobs", files=one(), headers=headers)
        assert cutter.cut.is_set(), "the proxy cut the COMMIT of the jobs"
        retry = client.post("/v1/jobs", files=one(), headers=headers)
    assert job_count(settings) == 1, "the retry created the job a second time"
    # The gateway found the rows its lost COMMIT wrote: the job was accepted once, and
    # the retry is told the same.
    assert first.status_code == 202, first.text
    assert retry.status_code == 202, retry.text
    assert retry.json()["job_id"] == first.json()["job_id"]
    assert retry.headers.get("Idempotent-Replayed") == "true"


def _failed_count(model: str) -> float:
    labels = {"model": model, "outcome": "failed"}
    return REGISTRY.get_sample_value("hepato_worker_jobs_total", labels) or 0.0


def test_a_fenced_out_worker_counts_no_failures_it_did_not_write(
    settings: Settings,
    client: TestClient,
    models: dict[str, Model],
    monkeypatch: pytest.MonkeyPatch,
    completions,
) -> None:
    from hepato.worker.runner import Worker

    monkeypatch.setenv("HEPATO_TEST_STEAL_DB", settings.database_url)
    accepted = [client.post("/v1/jobs", files=one(f"{i}.png")).json()["job_id"] for i in range(3)]
    model = settings.default_model
    before = _failed_count(model)
    dead_before = REGISTRY.get_sample_value("hepato_dead_lettered_total", {"model": model}) or 0.0
    worker = Worker(settings, models, burst=True, decode=steal_lease.steal_then_reject)
    worker.run(install_signals=False)
    with get_engine(settings.database_url).connect() as conn:
        states = conn.execute(select(Job.state, Job.worker_id)).all()
    assert states == [("done", "thief")] * 3, "the fence refused the worker's writes"
    assert _failed_count(model) == before, "failures the fence refused were counted"
    dead = REGISTRY.get_sample_value("hepato_dead_lettered_total", {"model": model}) or 0.0
    assert dead == dead_before
    judge(settings, "worker fenced out mid-batch (its failures refused)", accepted, completions)


def test_an_image_gone_from_the_store_is_a_404_not_a_503(
    client: TestClient, settings: Settings
) -> None:
    """A deleted object is not an outage: retrying after Retry-After would never help."""
    from hepato.common.storage import ObjectStore

    with (SAMPLES / "synthetic_00.png").open("rb") as image:
        accepted = client.post("/v1/jobs", files={"file": ("a.png", image, "image/png")})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    with get_engine(settings.database_url).connect() as conn:
        key = conn.execute(select(Job.object_key).where(Job.id == uuid.UUID(job_id))).scalar_one()
    ObjectStore(settings).client.remove_object(settings.s3_bucket, key)
    gone = client.get(f"/v1/jobs/{job_id}/image")
    assert gone.status_code == 404, gone.text
    assert gone.json()["detail"] == "the uploaded image is gone from the object store"
