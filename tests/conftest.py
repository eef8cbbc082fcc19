"""Shared fixtures. The end-to-end tests run on real services: the same local stack
``hepato up`` starts (embedded Postgres, redis-server, SeaweedFS S3), started once per
session under a temporary directory, or taken from HEPATO_TEST_* variables."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("HEPATO_TEST_SAMPLES", REPO / "samples"))
DEMO_WEIGHTS = REPO / "models" / "demo" / "hepato-yolov8n.pt"
MODELS_DIR = REPO / "models" / "manifests"


@pytest.fixture(scope="session")
def service_env() -> Iterator[dict[str, str]]:
    given = {
        "HEPATO_DATABASE_URL": os.environ.get("HEPATO_TEST_DATABASE_URL", ""),
        "HEPATO_REDIS_URL": os.environ.get("HEPATO_TEST_REDIS_URL", ""),
        "HEPATO_S3_ENDPOINT": os.environ.get("HEPATO_TEST_S3_ENDPOINT", ""),
    }
    if all(given.values()):
        yield given
        return
    from hepato.devstack.localstack import LocalStack

    with tempfile.TemporaryDirectory(prefix="hepato-test-") as root:
        stack = LocalStack(Path(root)).start()
        try:
            yield stack.env()
        finally:
            stack.stop()
