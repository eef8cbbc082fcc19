"""End-to-end fixtures: settings pointing at the real services, a clean database and
Redis per test (as arq does), the gateway in-process, and a burst-mode worker."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import text

from hepato.common.db import get_engine
from hepato.common.migrate import run_migrations
from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from tests.conftest import MODELS_DIR, REPO, SAMPLES
from tests.slides import planted


@pytest.fixture(scope="session")
def base_settings(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    run_migrations(service_env["HEPATO_DATABASE_URL"])
    return Settings(
        database_url=service_env["HEPATO_DATABASE_URL"],
        redis_url=service_env["HEPATO_REDIS_URL"],
        s3_endpoint=service_env["HEPATO_S3_ENDPOINT"],
        s3_bucket="hepato-test",
        data_dir=REPO / ".data",
        models_dir=MODELS_DIR,
        # Short timers so recovery paths finish within a test.
        lease_s=4.0,
        lease_extend_every_s=1.0,
        sweep_interval_s=0.5,
        requeue_pending_after_s=2.0,
        poll_timeout_s=0.2,
        max_wait_ms=50.0,
        max_batch_size=8,
        detect_timeout_s=60.0,
        # No API keys here: tests/security builds its clients with auth="required".
        auth="open",
    )


def reset(settings: Settings) -> None:
    """Empty every table a test writes, and Redis (as arq flushes per test)."""
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(
            text(
                "TRUNCATE jobs, batches, api_keys, idempotency_keys, webhook_deliveries, "
                "webhook_secrets CASCADE"
            )
        )
    redis.Redis.from_url(settings.redis_url).flushall()


@pytest.fixture
def settings(base_settings: Settings) -> Iterator[Settings]:
    reset(base_settings)
    yield base_settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    from hepato.gateway.app import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def models(base_settings: Settings) -> dict[str, Model]:
    """The default model (the demo detector on ONNX Runtime), loaded once."""
    from hepato.worker.backends.base import load_models

    return load_models(base_settings)


@pytest.fixture
def run_worker(settings: Settings, models: dict[str, Model]) -> Callable[..., object]:
    """Run a worker in burst mode until every job is finished (arq's burst fixture)."""
    from hepato.worker.runner import Worker

    def run(**overrides: object) -> Worker:
        worker = Worker(settings.model_copy(update=overrides), models, burst=True)
        worker.run(install_signals=False)
        return worker

    return run


@pytest.fixture
def worker_env(service_env: dict[str, str], settings: Settings) -> dict[str, str]:
    """Environment for a worker subprocess against the test services."""
    return {
        **os.environ,
        **service_env,
        "HEPATO_S3_BUCKET": settings.s3_bucket,
        "HEPATO_MODELS_DIR": str(settings.models_dir),
        "HEPATO_LEASE_S": str(settings.lease_s),
        "HEPATO_SWEEP_INTERVAL_S": "3600",
        "HEPATO_POLL_TIMEOUT_S": "0.2",
    }


def images(folder: Path, pattern: str) -> list[Path]:
    found = sorted(folder.glob(pattern))
    assert found, f"no {pattern} in {folder}"
    return found


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


# --- whole slides: the blob model of tests/slides/planted.py ------------------------
@pytest.fixture
def slide_settings(settings: Settings, tmp_path: Path) -> Settings:
    models = tmp_path / "models"
    models.mkdir()
    (models / "blobs.yaml").write_text(yaml.safe_dump(planted.MANIFEST))
    return settings.model_copy(
        update={
            "models_dir": models,
            "default_model": "blobs",
            "slide_cache_dir": tmp_path / "cache",
        }
    )


@pytest.fixture
def slide_client(slide_settings: Settings) -> Iterator[TestClient]:
    from hepato.gateway.app import create_app

    with TestClient(create_app(slide_settings)) as test_client:
        yield test_client


@pytest.fixture
def run_slide_workers(slide_settings: Settings) -> Callable[..., None]:
    """Run ``n`` burst workers of the blob model side by side until the queue is empty."""
    from hepato.worker.runner import Worker

    def run(n: int = 1, **overrides: object) -> None:
        workers = [
            Worker(
                slide_settings.model_copy(update={"worker_id": f"slide-w{i}", **overrides}),
                {"blobs": planted.BlobDetector(planted.manifest())},
                burst=True,
            )
            for i in range(n)
        ]
        threads = [
            threading.Thread(target=w.run, kwargs={"install_signals": False}) for w in workers
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive(), "a worker did not drain the queue"

    return run
