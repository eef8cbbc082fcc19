"""What a tenant is shown of the inside (issue 12, item 10): no worker host:pid, and no
error text naming the deployment's hosts, in a job's status or its event stream (the
database keeps the detail for the operator); and the rejected-files counter carries the
model label the README documents."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job
from hepato.worker.backends.base import Model
from tests.e2e import conftest as e2e
from tests.security import auth
from tests.security.auth import MakeClient, bearer, files, one

pytestmark = pytest.mark.slow

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of
models = e2e.models

# Nothing listens here: the worker's fetch fails with urllib3's text naming host and port.
DEAD_STORE = "127.0.0.1:9"


def test_a_tenant_sees_neither_the_worker_nor_internal_hosts_in_a_failed_job(
    settings: Settings, make_client: MakeClient, key_of, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    # Nothing inline: the image must come from the (dead) store.
    client = make_client(max_attempts=1, inline_max_bytes=0)
    headers = bearer(key_of("acme"))
    job_id = client.post("/v1/jobs", files=one(), headers=headers).json()["job_id"]
    down = settings.model_copy(update={"s3_endpoint": DEAD_STORE, "max_attempts": 1})
    Worker(down, models, burst=True).run(install_signals=False)

    with get_engine(settings.database_url).connect() as conn:
        error, worker_id = conn.execute(
            select(Job.error, Job.worker_id).where(Job.id == job_id)
        ).one()
    assert DEAD_STORE.split(":")[0] in error, "the database keeps the detail"
    assert worker_id

    status = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert status.json()["state"] == "failed"
    events = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    assert events.status_code == 200
    for shown in (status.text, events.text):
        assert DEAD_STORE.split(":")[0] not in shown, shown
        assert "HTTPConnectionPool" not in shown, shown
        assert worker_id not in shown, shown
    body = status.json()
    assert "worker_id" not in body
    assert body["error"], "a failed job still says it failed on an internal error"


def test_rejected_files_are_counted_per_model(settings: Settings, client: TestClient) -> None:
    def rejected(model: str) -> float:
        text = client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "hepato_rejected_files_total" and sample.labels == {
                    "model": model
                }:
                    return sample.value
        return 0.0

    before = rejected(settings.default_model)
    sent = [*files(auth.PNG), ("files", ("notes.png", b"not an image", "image/png"))]
    response = client.post("/v1/batches", files=sent)
    assert response.status_code == 202
    assert len(response.json()["rejected"]) == 1
    assert rejected(settings.default_model) == before + 1


# Open mode: /metrics and uploads without keys, as the e2e client.
client = e2e.client
