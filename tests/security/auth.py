"""A gateway that requires API keys (the end-to-end settings run it open), keys per
tenant, and small helpers to post sample images as a tenant: what test_access.py and
test_idempotency.py share."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text

from hepato.common import tenants
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job
from tests.conftest import SAMPLES
from tests.slides import planted

PNG = SAMPLES / "synthetic_00.png"
OTHER_PNG = SAMPLES / "synthetic_01.png"

Files = list[tuple[str, tuple[str, bytes, str]]]
MakeClient = Callable[..., TestClient]


def files(*paths: Any) -> Files:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def one(path: Any = PNG) -> Files:
    return [("file", (path.name, path.read_bytes(), "image/png"))]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def engine(settings: Settings) -> Engine:
    engine = get_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE api_keys, idempotency_keys"))
    return engine


@pytest.fixture
def make_client(settings: Settings, engine: Engine) -> Iterator[MakeClient]:
    """A gateway with auth required (the e2e settings run it open), other settings
    overridable per test."""
    from hepato.gateway.app import create_app

    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(settings.model_copy(update={"auth": "required", **overrides}))
        client = TestClient(app).__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.fixture
def key_of(engine: Engine) -> Callable[[str], str]:
    return lambda tenant: tenants.create_key(engine, tenant).key


def count(engine: Engine, model: type[Batch] | type[Job]) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


@dataclass(frozen=True)
class TenantSlide:
    """A slide of tenant A submitted through a gateway that requires keys, with the blob
    test model: what every slide access test starts from."""

    client: TestClient
    owner: dict[str, str]  # tenant A's headers
    other: dict[str, str]  # tenant B's headers
    slide_id: str
    missing: str  # an id no slide has


def tenant_slide(
    make_client: MakeClient,
    key_of: Callable[[str], str],
    tmp_path: Path,
    slide: Path,
    **overrides: Any,
) -> TenantSlide:
    models = tmp_path / "models"
    models.mkdir()
    (models / "blobs.yaml").write_text(yaml.safe_dump(planted.MANIFEST))
    client = make_client(models_dir=models, default_model="blobs", **overrides)
    a, b = bearer(key_of("tenant-a")), bearer(key_of("tenant-b"))
    with slide.open("rb") as f:
        r = client.post("/v1/slides", files={"file": (slide.name, f)}, headers=a)
    assert r.status_code == 202, r.text
    return TenantSlide(client, a, b, r.json()["slide_id"], str(uuid.uuid4()))
