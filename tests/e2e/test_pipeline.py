"""The core pipeline end to end on real Postgres, Redis and S3."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from hepato.common.db import session_factory
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from tests.conftest import SAMPLES
from tests.e2e.conftest import images

pytestmark = pytest.mark.slow


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def submit(client: TestClient, paths: list[Path], **form: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/batches", files=upload(paths), data=form)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def thirty_two() -> list[Path]:
    synthetic = images(SAMPLES, "synthetic_*.png")
    return [synthetic[i % len(synthetic)] for i in range(32)]


def db_jobs(settings: Settings) -> list[Job]:
    with session_factory(settings.database_url)() as session:
        return list(session.scalars(select(Job)))


def slow_models_dir(settings: Settings, folder: Path) -> Path:
    """The default model at 640 px instead of 320, so that a batch takes a while."""
    from hepato.common.manifest import dump_manifest, load_registry

    manifest = load_registry(settings.models_dir)[settings.default_model]
    slow = manifest.model_copy(update={"input_size": 640, "weights": manifest.weights_path})
    folder.mkdir(exist_ok=True)
    dump_manifest(slow, folder / f"{slow.name}.yaml")
    return folder


def start_worker_until_it_claims(
    settings: Settings, env: dict[str, str], worker_id: str, tmp_path: Path
) -> tuple[subprocess.Popen, list[Job]]:  # type: ignore[type-arg]
    """Start a worker process (slowed by a larger input size, so a batch takes a while)
    and return once it holds a claimed batch."""
    env = {
        **env,
        "HEPATO_WORKER_ID": worker_id,
        "HEPATO_MAX_BATCH_SIZE": "16",
        "HEPATO_MODELS_DIR": str(slow_models_dir(settings, tmp_path / "slow-models")),
    }
    proc = subprocess.Popen([sys.executable, "-m", "hepato", "worker"], env=env)
    deadline = time.monotonic() + 120
    held: list[Job] = []
    while not held and time.monotonic() < deadline:
        held = [j for j in db_jobs(settings) if j.state == "processing"]
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early with {proc.returncode}")
        time.sleep(0.02)
    if not held:
        proc.kill()
        raise AssertionError("the worker never claimed a batch")
    return proc, held


def test_batch_of_32_all_done_with_detections_and_uploads(
    client: TestClient, settings: Settings, run_worker
) -> None:
    accepted = submit(client, thirty_two())
    assert accepted["accepted"] == 32 and accepted["rejected"] == []
    assert {j["filename"] for j in accepted["jobs"]} <= {p.name for p in thirty_two()}
    assert client.get(accepted["status_url"]).json()["state"] == "pending"

    run_worker()

    batch = client.get(accepted["status_url"], params={"page_size": 10}).json()
    assert batch["state"] == "done"
    assert batch["total"] == 32 and batch["counts"]["done"] == 32
    assert len(batch["jobs"]) == 10 and batch["next_page_url"]
    jobs = db_jobs(settings)
    assert len(jobs) == 32 and all(j.state == "done" for j in jobs)
    store = ObjectStore(settings)
    assert all(store.exists(j.object_key) for j in jobs)
    assert sum(len(j.result["boxes"]) for j in jobs if j.result) > 0, (
        "the demo model finds vacuoles on the synthetic samples"
    )
    job = client.get(accepted["jobs"][0]["status_url"]).json()
    assert job["state"] == "done" and job["task"] == "detect"
    assert job["model"] == {"name": "hepato-yolov8n", "version": "1"}
    assert job["result"]["task"] == "detect" and job["result"]["boxes"]
    assert job["started_at"] and job["finished_at"] and job["queue_wait_ms"] is not None
    assert job["inference_ms"] > 0 and job["attempts"] == 1
    box = job["result"]["boxes"][0]
    assert box["label"] in {"fibrosis", "inflammation", "steatosis", "ballooning"}
    assert 0 <= box["x1"] < box["x2"] <= 320 and 0 <= box["score"] <= 1
    image = client.get(job["image_url"])
    assert image.status_code == 200 and image.content == thirty_two()[0].read_bytes()


def test_microbatches_larger_than_one_when_queued(
    client: TestClient, settings: Settings, run_worker
) -> None:
    submit(client, thirty_two())
    worker = run_worker(max_batch_size=8)
    sizes = [j.batch_size for j in db_jobs(settings)]
    assert max(sizes) == 8  # type: ignore[type-var]
    assert worker.batches <= 8, f"32 queued jobs took {worker.batches} microbatches"


def test_pipeline_equals_direct_model_predict(
    client: TestClient, settings: Settings, run_worker
) -> None:
    """The default model runs on ONNX Runtime; each image's boxes through the whole
    service equal what ultralytics on PyTorch gives for the same weights and file."""
    from ultralytics import YOLO

    from hepato.common.manifest import load_registry
    from tests.conftest import DEMO_WEIGHTS

    manifest = load_registry(settings.models_dir)[settings.default_model]
    assert manifest.backend == "onnx"
    paths = [*images(SAMPLES, "*.png"), *images(SAMPLES, "*.jpg")]
    accepted = submit(client, paths)
    run_worker(max_batch_size=16)
    direct = YOLO(str(DEMO_WEIGHTS), task="detect")
    compared = 0
    for job, path in zip(accepted["jobs"], paths, strict=True):
        got = client.get(job["status_url"]).json()["result"]["boxes"]
        want = direct.predict(
            str(path),
            imgsz=manifest.input_size,
            conf=manifest.options.score_threshold,
            iou=manifest.options.iou,
            device="cpu",
            verbose=False,
        )[0].boxes
        assert [d["label"] for d in got] == [direct.names[int(c)] for c in want.cls], path.name
        for d, box, score in zip(got, want.xyxy.tolist(), want.conf.tolist(), strict=True):
            assert [d["x1"], d["y1"], d["x2"], d["y2"]] == pytest.approx(box, abs=1e-2), path.name
            assert d["score"] == pytest.approx(score, abs=1e-4), path.name
            compared += 1
    assert compared > 0


def test_killed_worker_loses_nothing(
    client: TestClient,
    settings: Settings,
    run_worker,
    worker_env: dict[str, str],
    tmp_path: Path,
) -> None:
    accepted = submit(client, thirty_two())
    proc, held = start_worker_until_it_claims(settings, worker_env, "doomed", tmp_path)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(j.worker_id == "doomed" for j in held)

    run_worker()

    jobs = db_jobs(settings)
    assert len(jobs) == accepted["accepted"] == 32
    assert all(j.state == "done" for j in jobs), Counter(j.state for j in jobs)
    redelivered = [j for j in jobs if j.attempts > 1]
    assert redelivered, "the killed batch was finished by another worker"
    assert all(j.worker_id != "doomed" for j in redelivered)
    assert all(j.result and j.result["task"] == "detect" for j in jobs)


def test_redis_flushed_while_pending_loses_nothing(
    client: TestClient, settings: Settings, run_worker
) -> None:
    accepted = submit(client, images(SAMPLES, "synthetic_*.png"))
    redis.Redis.from_url(settings.redis_url).flushall()
    run_worker()
    jobs = db_jobs(settings)
    assert len(jobs) == accepted["accepted"]
    assert all(j.state == "done" for j in jobs)


def test_malformed_file_in_batch_is_named_and_the_rest_accepted(
    client: TestClient, settings: Settings, run_worker
) -> None:
    good = images(SAMPLES, "synthetic_*.png")[:3]
    files = [
        *upload(good),
        ("files", ("notes.png", b"<html>not an image</html>", "image/png")),
        ("files", ("truncated.png", good[0].read_bytes()[:200], "image/png")),
    ]
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 3
    rejected = {r["filename"]: r for r in body["rejected"]}
    assert set(rejected) == {"notes.png", "truncated.png"}
    assert rejected["notes.png"]["status_code"] == 415
    assert "not an accepted image format" in rejected["notes.png"]["error"]
    assert "PNG" in rejected["truncated.png"]["error"]
    run_worker()
    assert client.get(body["status_url"]).json()["state"] == "done"


def test_malformed_single_upload_is_a_4xx_naming_the_problem(client: TestClient) -> None:
    response = client.post("/v1/jobs", files={"file": ("x.jpg", b"%PDF-1.7 nope", "image/jpeg")})
    assert response.status_code == 415
    assert "x.jpg" in response.json()["detail"]
    assert "not an accepted image format" in response.json()["detail"]
    response = client.post("/v1/batches", files=[("files", ("y.png", b"", "image/png"))])
    assert response.status_code == 422
    assert response.json()["rejected"][0]["error"] == "empty file"


def test_unknown_ids_are_404(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/v1/jobs/not-a-uuid").status_code == 404
    assert client.get(f"/v1/batches/{uuid.uuid4()}").status_code == 404


def test_unknown_model_is_refused(client: TestClient) -> None:
    path = images(SAMPLES, "synthetic_*.png")[0]
    response = client.post("/v1/batches", files=upload([path]), data={"model": "nope"})
    assert response.status_code == 422 and "unknown model" in response.json()["detail"]


def test_seed_calls_verbatim_and_health(client: TestClient, settings: Settings, models) -> None:
    import threading

    from hepato.worker.runner import Worker

    # A long-running worker in a thread serves /v1/detect, which waits for the result.
    worker = Worker(settings, models)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    try:
        path = images(SAMPLES, "synthetic_*.png")[0]
        response = client.post("/v1/detect", files={"file": ("sample.jpg", path.read_bytes())})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["result"]["boxes"] and body["latency_ms"] > 0
        assert body["task"] == "detect" and body["model"]["version"] == "1"
        assert (body["width"], body["height"]) == Image.open(io.BytesIO(path.read_bytes())).size
        # Where the time went: every step of the request, in order, and the rest as other.
        stages_ms = body["stages_ms"]
        assert list(stages_ms) == [
            *("upload", "queue", "claim", "download", "decode", "preprocess", "to_model"),
            *("inference", "to_write", "postprocess", "write", "other"),
        ]
        assert all(v >= 0 for v in stages_ms.values())
        assert sum(stages_ms.values()) == pytest.approx(body["latency_ms"], abs=1.0)
        two = images(SAMPLES, "synthetic_*.png")[:2]
        response = client.post("/v1/assets", files=upload(two))
        assert response.status_code == 202 and response.json()["accepted"] == 2
    finally:
        worker.stopping.set()
        thread.join(timeout=30)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path_name in (
        "/v1/batches",
        "/v1/jobs",
        "/v1/detect",
        "/v1/predict",
        "/v1/models",
        "/v1/assets",
        "/v1/jobs/{job_id}",
        "/v1/batches/{batch_id}",
    ):
        assert path_name in paths


def test_sigterm_finishes_the_batch_in_hand_and_exits(
    client: TestClient, settings: Settings, worker_env: dict[str, str], tmp_path: Path
) -> None:
    # Four batches of 16: the worker holds at most two (one on the model, one prefetched).
    submit(client, thirty_two())
    submit(client, thirty_two())
    proc, held = start_worker_until_it_claims(settings, worker_env, "polite", tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    jobs = {j.id: j for j in db_jobs(settings)}
    assert all(jobs[j.id].state == "done" for j in held), "the batch in hand was finished"
    assert not [j for j in jobs.values() if j.state == "processing"]
    assert [j for j in jobs.values() if j.state == "pending"], "it stopped taking work"


def test_a_model_error_is_retried_then_the_job_fails(
    client: TestClient, settings: Settings
) -> None:
    from hepato.common.manifest import load_registry
    from hepato.worker.runner import Worker

    class Broken:
        manifest = load_registry(settings.models_dir)[settings.default_model]

        def predict(self, images: list) -> tuple:  # type: ignore[type-arg]
            raise RuntimeError("model exploded")

    accepted = submit(client, images(SAMPLES, "synthetic_*.png")[:2])
    Worker(settings, {settings.default_model: Broken()}, burst=True).run(install_signals=False)
    jobs = db_jobs(settings)
    assert len(jobs) == accepted["accepted"] == 2
    for job in jobs:
        assert job.state == "failed"
        assert job.attempts == settings.max_attempts
        assert job.error and "model exploded" in job.error and "gave up after" in job.error
    body = client.get(accepted["status_url"]).json()
    assert body["state"] == "done_with_failures" and body["counts"]["failed"] == 2


@pytest.mark.parametrize(
    ("service", "override"),
    [
        ("Redis", {"redis_url": "redis://127.0.0.1:1/0"}),
        ("database", {"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"}),
    ],
)
def test_a_service_down_is_503_with_retry_after_and_nothing_kept(
    settings: Settings, service: str, override: dict[str, str]
) -> None:
    from hepato.gateway.app import create_app

    path = images(SAMPLES, "synthetic_*.png")[0]
    with TestClient(create_app(settings.model_copy(update=override))) as down:
        response = down.post("/v1/batches", files=upload([path]))
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert service in response.json()["detail"]
        assert down.get("/readyz").status_code == 503
    assert db_jobs(settings) == []


def test_cancel_what_has_not_started(client: TestClient, settings: Settings, run_worker) -> None:
    paths = images(SAMPLES, "synthetic_*.png")
    batch = submit(client, paths)
    single = client.post("/v1/jobs", files={"file": (paths[0].name, paths[0].read_bytes())})
    job_url = single.json()["status_url"]

    first = batch["jobs"][0]["status_url"]
    assert client.delete(first).json()["canceled"] == 1
    assert client.delete(first).status_code == 200, "canceling twice is harmless"
    assert client.delete(batch["status_url"]).json()["canceled"] == len(paths) - 1
    assert client.delete(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.delete(f"/v1/batches/{uuid.uuid4()}").status_code == 404

    run_worker()  # their ids are still on Redis: the worker must drop them, not run them
    body = client.get(batch["status_url"]).json()
    assert body["state"] == "done" and body["counts"]["canceled"] == len(paths)
    assert all(j["result"] is None and j["started_at"] is None for j in body["jobs"])
    assert client.get(job_url).json()["state"] == "done"
    response = client.delete(job_url)
    assert response.status_code == 409 and "done" in response.json()["detail"]


def test_a_job_past_its_deadline_expires_and_never_runs(
    client: TestClient, settings: Settings, run_worker
) -> None:
    paths = images(SAMPLES, "synthetic_*.png")[:2]
    accepted = submit(client, paths, deadline_s="0.05")
    deadline = max(j.deadline_at for j in db_jobs(settings) if j.deadline_at)
    while datetime.now(UTC) <= deadline:  # no worker may run before the deadline has passed
        time.sleep(0.01)
    run_worker()
    for job in client.get(accepted["status_url"]).json()["jobs"]:
        assert job["state"] == "expired" and job["attempts"] == 0 and job["started_at"] is None
        assert "deadline" in job["error"]
    assert client.get(accepted["status_url"]).json()["state"] == "done_with_failures"
