"""A Triton that is down: the backend tries it again as the object store is tried, then
raises ModelUnavailable, which the worker takes as an outage (the microbatch back to the
queue whole, no image blamed), and works again once Triton is back."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hepato.common.exceptions import ModelUnavailable
from hepato.common.manifest import DetectManifest, dump_manifest
from hepato.common.settings import Settings
from hepato.devstack.localstack import free_port
from hepato.devstack.triton import TritonServer
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.triton import TritonRetry, YoloTriton, transient
from tests.chaos.conftest import wait_for
from tests.e2e import conftest as e2e
from tests.e2e.test_pipeline import db_jobs, submit, thirty_two
from tests.triton.conftest import DETECTOR, Registry, Served

# The end-to-end fixtures (real Postgres, Redis, S3), for the worker-level case.
base_settings, settings = e2e.base_settings, e2e.settings

RUNTIME = Runtime(device="cpu", threads=1)
QUICK = TritonRetry(attempts=3, backoff_s=0.01)
PROTOCOLS: list[Literal["grpc", "http"]] = ["grpc", "http"]


def pointed(manifest: DetectManifest, url: str, protocol: str) -> DetectManifest:
    assert manifest.triton is not None
    options = manifest.triton.model_copy(update={"url": url, "protocol": protocol})
    return manifest.model_copy(update={"triton": options})


def attempts_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unavailable for" in r.getMessage()]


@pytest.fixture
def own_server(registry: Registry, tmp_path: Path) -> TritonServer:
    """A Triton of this test's own (the detector alone), to stop and start again."""
    repository = tmp_path / "repository"
    shutil.copytree(registry.repository / DETECTOR, repository / DETECTOR)
    return TritonServer(repository, threads=1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_closed_port_is_tried_again_then_unavailable(
    served: Served, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = served.manifest(DETECTOR)
    assert isinstance(manifest, DetectManifest)
    closed = f"127.0.0.1:{free_port()}"
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(ModelUnavailable, match="after 3 attempts") as raised,
    ):
        YoloTriton(pointed(manifest, closed, protocol), RUNTIME, QUICK)
    tries = attempts_logged(caplog)
    assert [t.split("(attempt ")[1][:6] for t in tries] == ["1 of 3", "2 of 3", "3 of 3"]
    assert closed in str(raised.value) and "model metadata" in str(raised.value)


def test_what_is_an_outage_and_what_is_not() -> None:
    from tritonclient.utils import InferenceServerException

    def answer(status: str, message: str = "") -> InferenceServerException:
        return InferenceServerException(message, status=status)

    assert transient(ConnectionRefusedError(111, "Connection refused"))
    assert transient(answer("StatusCode.UNAVAILABLE"))
    assert transient(answer("StatusCode.DEADLINE_EXCEEDED"))
    assert transient(answer("400", "Request for unknown model: 'm' is not found"))
    assert transient(answer("503"))
    # A request Triton refuses, or a model that raised: an image may be the culprit.
    assert not transient(answer("StatusCode.INVALID_ARGUMENT", "unexpected shape"))
    assert not transient(answer("500", "model raised"))
    assert not transient(ValueError("bad image"))


def test_a_triton_that_goes_down_and_comes_back(
    served: Served, own_server: TritonServer, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = served.manifest(DETECTOR)
    assert isinstance(manifest, DetectManifest)
    images = [np.full((256, 256, 3), 200, np.uint8)] * 2
    with own_server:
        models = {
            p: YoloTriton(pointed(manifest, own_server.url(p), p), RUNTIME, QUICK)
            for p in PROTOCOLS
        }
        before = {p: m.predict(images)[0] for p, m in models.items()}
    with caplog.at_level(logging.WARNING):
        for model in models.values():
            with pytest.raises(ModelUnavailable, match=r"inference .* after 3 attempts"):
                model.predict(images)
    assert len(attempts_logged(caplog)) == 3 * len(PROTOCOLS)
    with own_server:  # the same ports again
        for protocol, model in models.items():
            assert model.predict(images)[0] == before[protocol]


@pytest.mark.slow
def test_a_job_whose_triton_is_down_is_neither_failed_nor_lost(
    settings: Settings, served: Served, own_server: TritonServer, tmp_path: Path
) -> None:
    """As tests/chaos/test_retries for the object store: the first attempt meets the
    outage, the job waits out its backoff, and is done once Triton is back."""
    from hepato.gateway.app import create_app
    from hepato.worker.runner import Worker

    manifest = served.manifest(DETECTOR)
    assert isinstance(manifest, DetectManifest)
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    with own_server:
        served_here = pointed(manifest, own_server.url("grpc"), "grpc")
        dump_manifest(served_here, models_dir / f"{served_here.name}.yaml")
        model = YoloTriton(served_here, RUNTIME)
        # Retries after 7.5-15 s: longer than Triton takes to come back.
        s = settings.model_copy(
            update={
                "models_dir": models_dir,
                "default_model": served_here.name,
                "retry_backoff_s": 15.0,
            }
        )
        with TestClient(create_app(s)) as client:
            batch = submit(client, thirty_two()[:4], model=served_here.name)
    accepted = {j["job_id"] for j in batch["jobs"]}
    worker = Worker(s, {served_here.name: model}, burst=True)
    run = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    run.start()
    try:
        wait_for(
            "every job's first attempt to meet the outage",
            lambda: (
                (jobs := db_jobs(s))
                and all(j.state == "pending" and j.attempts == 1 for j in jobs)
                # An outage, not a culprit image: the batch went back whole.
                and all((j.error or "").startswith("Triton at") for j in jobs)
            ),
            60,
        )
        with own_server:
            run.join(120)
    finally:
        run.join(120)
    assert not run.is_alive(), "the burst worker did not finish"
    jobs = db_jobs(s)
    assert {str(j.id) for j in jobs} == accepted, "no job lost"
    assert {j.state for j in jobs} == {"done"}, [(j.state, j.error) for j in jobs]
    assert all(j.attempts in (2, 3) for j in jobs)
