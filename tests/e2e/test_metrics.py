"""The gateway's /metrics and a job's timeline, on real Postgres, Redis and S3."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from hepato.common.settings import Settings
from tests.conftest import SAMPLES
from tests.e2e.conftest import images

pytestmark = pytest.mark.slow


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def jobs_in(
    got: dict[tuple[str, frozenset[tuple[str, str]]], float], model: str, state: str
) -> float:
    return got[("hepato_jobs", frozenset({"model": model, "state": state}.items()))]


def test_metrics_count_jobs_and_a_job_has_its_timeline(
    client: TestClient, run_worker: Callable[..., object], settings: Settings
) -> None:
    model = settings.default_model
    submitted_before = scrape(client).get(
        ("hepato_submitted_total", frozenset({"model": model}.items())), 0.0
    )
    files = [
        ("files", (p.name, p.read_bytes(), "image/png"))
        for p in images(SAMPLES, "synthetic_*.png")[:2]
    ]
    accepted = client.post("/v1/batches", files=files)
    assert accepted.status_code == 202, accepted.text
    job_ids = [j["job_id"] for j in accepted.json()["jobs"]]
    assert len(job_ids) == 2

    waiting = scrape(client)
    assert jobs_in(waiting, model, "pending") == 2
    depth = sum(
        value
        for (name, labels), value in waiting.items()
        if name == "hepato_queue_depth" and dict(labels)["model"] == model
    )
    assert depth == 2

    run_worker()

    got = scrape(client)
    assert jobs_in(got, model, "done") == 2

    # The worker ran in this process, so its metrics share the registry scraped here.
    def grew(name: str, by: float, **labels: str) -> bool:
        key = (name, frozenset({"model": model, **labels}.items()))
        return got.get(key, 0.0) - waiting.get(key, 0.0) >= by

    assert grew("hepato_worker_jobs_total", 2, outcome="done")
    assert grew("hepato_job_latency_seconds_count", 2)
    assert grew("hepato_queue_wait_seconds_count", 2)
    assert grew("hepato_batch_size_count", 1)
    for stage in ("download", "decode", "preprocess", "inference", "postprocess", "write"):
        assert grew("hepato_stage_seconds_count", 1, stage=stage), stage
    assert jobs_in(got, model, "pending") == 0
    submitted = got[("hepato_submitted_total", frozenset({"model": model}.items()))]
    assert submitted == submitted_before + 2

    for job_id in job_ids:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "done"
        timeline = {k: datetime.fromisoformat(v) if v else None for k, v in job["timeline"].items()}
        assert timeline["queued"] is not None
        assert timeline["claimed"] is not None
        assert timeline["written"] is not None
        assert timeline["queued"] <= timeline["claimed"] <= timeline["written"]
        # fetched and inferred come from the worker's clock, the rest from Postgres's:
        # one machine here, so one clock.
        assert timeline["claimed"] <= timeline["fetched"] <= timeline["inferred"]
        assert timeline["inferred"] <= timeline["written"]
        # The same run as steps: the gateway's, the worker's own and the waits between.
        stages_ms = job["stages_ms"]
        assert list(stages_ms) == [
            *("upload", "queue", "claim", "download", "decode", "preprocess", "to_model"),
            *("inference", "to_write", "postprocess", "write"),
        ]
        assert stages_ms["inference"] == pytest.approx(job["inference_ms"], abs=0.1)
        assert stages_ms["queue"] == pytest.approx(job["queue_wait_ms"], abs=0.1)


def test_metrics_need_no_api_key(settings: Settings) -> None:
    from hepato.gateway.app import create_app

    app = create_app(settings.model_copy(update={"auth": "required"}))
    with TestClient(app) as client:
        assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 401
        got = scrape(client)
    assert (
        "hepato_jobs",
        frozenset({"model": settings.default_model, "state": "done"}.items()),
    ) in got
