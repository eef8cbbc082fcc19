"""Access on real Postgres, Redis and S3: API keys per tenant, tenant isolation, presigned
image links that expire, and the migration that brought tenants. Idempotency-Key on
submissions is in test_idempotency.py."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text
from typer.testing import CliRunner

from hepato.common import tenants
from hepato.common.settings import Settings, get_settings
from hepato.common.tables import ApiKey, Batch, Job
from tests.security import auth
from tests.security.auth import OTHER_PNG, PNG, MakeClient, bearer, count, files, one

pytestmark = pytest.mark.slow

# Fixtures are found by the module attributes that hold them.
engine = auth.engine
make_client = auth.make_client
client = auth.client
key_of = auth.key_of

OPEN_ROUTES = {"/v1/models"}


# --- keys ---------------------------------------------------------------------------


def test_every_call_but_health_docs_and_models_needs_a_valid_key(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    guarded = [
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/v1/") and path not in OPEN_ROUTES
        for method in operations
    ]
    assert len(guarded) >= 11, guarded
    some_id = str(uuid.uuid4())
    for method, template in guarded:
        path = template.replace("{job_id}", some_id).replace("{batch_id}", some_id)
        for headers in ({}, bearer("hpk_not-a-key"), {"X-API-Key": "hpk_not-a-key"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/v1/models"):
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize("key", [None, "hpk_not-a-key"])
def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(
    settings: Settings, engine: Engine, key: str | None
) -> None:
    import asyncio

    from hepato.gateway.app import create_app

    app = create_app(settings.model_copy(update={"auth": "required"}))
    reads: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=b")]
    if key:
        headers.append((b"x-api-key", key.encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/batches",
        "raw_path": b"/v1/batches",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401
    assert reads == [], "not one chunk of the body was read"


def test_a_key_works_in_either_header_until_it_is_revoked(
    client: TestClient, engine: Engine
) -> None:
    created = tenants.create_key(engine, "lab-a", "scanner 1")
    missing = f"/v1/jobs/{uuid.uuid4()}"
    assert client.get(missing, headers=bearer(created.key)).status_code == 404
    assert client.get(missing, headers={"X-API-Key": created.key}).status_code == 404
    accepted = client.post("/v1/jobs", files=one(), headers=bearer(created.key))
    assert accepted.status_code == 202, accepted.text

    assert tenants.revoke_key(engine, created.key_id) is not None
    for headers in (bearer(created.key), {"X-API-Key": created.key}):
        refused = client.get(accepted.json()["status_url"], headers=headers)
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    assert client.post("/v1/jobs", files=one(), headers=bearer(created.key)).status_code == 401
    assert count(engine, Job) == 1, "a revoked key submits nothing"


def test_keys_cli_creates_shows_once_lists_and_revokes(
    client: TestClient, engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hepato.cli.main import app

    monkeypatch.setenv("HEPATO_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        made = runner.invoke(app, ["keys", "create", "lab-b", "--name", "pathologist"])
        assert made.exit_code == 0, made.output
        fields = dict(line.split(":", 1) for line in made.stdout.splitlines())
        key, key_id = fields["api key"].strip(), fields["key id"].strip()
        assert key.startswith("hpk_") and len(key) >= 40
        assert "shown only this once" in made.output

        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(ApiKey))]
        assert len(rows) == 1 and rows[0]["tenant"] == "lab-b"
        assert rows[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
        stored = " ".join(str(v) for v in rows[0].values())
        assert key not in stored and key[len(tenants.KEY_MARK) :] not in stored, (
            "the database holds only a hash and a short prefix"
        )
        assert key[: tenants.PREFIX_CHARS] == rows[0]["prefix"] and len(rows[0]["prefix"]) == 12

        listed = runner.invoke(app, ["keys", "list"])
        assert listed.exit_code == 0, listed.output
        assert key_id in listed.output and "lab-b" in listed.output
        assert "pathologist" in listed.output and rows[0]["prefix"] in listed.output
        assert key not in listed.output and rows[0]["key_hash"] not in listed.output
        assert (
            client.get("/v1/batches/" + str(uuid.uuid4()), headers=bearer(key)).status_code == 404
        )

        revoked = runner.invoke(app, ["keys", "revoke", key_id])
        assert revoked.exit_code == 0 and "revoked" in revoked.output
        assert (
            client.get("/v1/batches/" + str(uuid.uuid4()), headers=bearer(key)).status_code == 401
        )
        with engine.connect() as conn:
            revoked_at = conn.execute(select(ApiKey.revoked_at)).scalar_one()
        listed = runner.invoke(app, ["keys", "list", "--tenant", "lab-b"])
        assert revoked_at is not None
        assert revoked_at.isoformat(timespec="seconds") in listed.output

        assert runner.invoke(app, ["keys", "revoke", "key_nope"]).exit_code == 1
        bad = runner.invoke(app, ["keys", "create", "Not A Tenant"])
        assert bad.exit_code == 2 and count(engine, Job) == 0
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(ApiKey)).scalar_one() == 1
    finally:
        get_settings.cache_clear()


# --- tenant isolation -----------------------------------------------------------------


def test_a_tenant_cannot_see_cancel_or_download_another_tenants_work(
    client: TestClient, engine: Engine, key_of: Callable[[str], str]
) -> None:
    a, b = bearer(key_of("tenant-a")), bearer(key_of("tenant-b"))
    batch = client.post("/v1/batches", files=files(PNG, OTHER_PNG), headers=a)
    job = client.post("/v1/jobs", files=one(), headers=a)
    assert batch.status_code == job.status_code == 202
    batch_id, job_id = batch.json()["batch_id"], job.json()["job_id"]
    batch_job = batch.json()["jobs"][0]["job_id"]
    missing = str(uuid.uuid4())

    def answer(method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        response = client.request(method, path, headers=headers)
        return response.status_code, response.json()["detail"]

    def states() -> Counter[str]:
        with engine.connect() as conn:
            return Counter(conn.execute(select(Job.state)).scalars())

    calls = [
        (method, kind, own, suffix)
        for kind, own, suffixes in (
            ("jobs", job_id, ("", "/image", "/image_url")),
            ("jobs", batch_job, ("", "/image", "/image_url")),
            ("batches", batch_id, ("",)),
        )
        for method, suffix in [("GET", x) for x in suffixes] + [("DELETE", "")]
    ]
    for method, kind, own, suffix in calls:
        theirs = answer(method, f"/v1/{kind}/{own}{suffix}", b)
        unknown = answer(method, f"/v1/{kind}/{missing}{suffix}", b)
        assert theirs[0] == unknown[0] == 404, (method, kind, suffix)
        assert theirs[1] == unknown[1].replace(missing, own), "the same answer as no such id"
    assert states() == {"pending": 3}, "tenant B's DELETEs canceled nothing"

    for method, kind, own, suffix in calls:
        mine = client.request(method, f"/v1/{kind}/{own}{suffix}", headers=a)
        assert mine.status_code == 200, (method, kind, suffix, mine.text)
    assert states() == {"canceled": 3}, "tenant A's own DELETEs did"
    with engine.connect() as conn:
        assert Counter(conn.execute(select(Job.tenant)).scalars()) == {"tenant-a": 3}
        assert conn.execute(select(Batch.tenant)).scalar_one() == "tenant-a"


# --- presigned image links --------------------------------------------------------------


def test_a_presigned_image_link_works_until_it_expires(
    make_client: MakeClient, key_of: Callable[[str], str]
) -> None:
    client = make_client(presign_expiry_s=2)
    headers = bearer(key_of("lab"))
    job = client.post("/v1/jobs", files=one(), headers=headers).json()
    link = client.get(f"/v1/jobs/{job['job_id']}/image_url", headers=headers)
    assert link.status_code == 200 and link.json()["expires_in_s"] == 2
    url = link.json()["url"]
    assert "X-Amz-Expires=2" in url and "X-Amz-Signature=" in url

    fresh = httpx.get(url, timeout=10)
    assert fresh.status_code == 200 and fresh.content == PNG.read_bytes()
    time.sleep(3.5)
    stale = httpx.get(url, timeout=10)
    assert stale.status_code == 403, (stale.status_code, stale.text[:300])
    assert "expired" in stale.text.lower(), stale.text[:300]
    unsigned = httpx.get(url.split("?")[0], timeout=10)
    assert unsigned.status_code == 403, "the bucket is not public: only a signature opens it"


# --- schema ---------------------------------------------------------------------------


def test_migration_0003_gives_old_rows_to_public_and_matches_the_orm(
    engine: Engine, settings: Settings
) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext

    from hepato.common.migrate import migrations_dir
    from hepato.common.tables import Base

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = settings.database_url
    old_batch = uuid.uuid4()
    try:
        command.downgrade(config, "0002")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO batches (id, model, priority, total) "
                    "VALUES (:id, 'hepato-yolov8n', 'routine', 0)"
                ),
                {"id": old_batch},
            )
    finally:
        command.upgrade(config, "head")
    with engine.connect() as conn:
        assert conn.execute(select(Batch.tenant).where(Batch.id == old_batch)).scalar_one() == (
            tenants.PUBLIC_TENANT
        )
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], "the ORM models and the migrations differ"
