"""Access on real Postgres, Redis and S3: API keys per tenant, tenant isolation,
Idempotency-Key on submissions, and presigned image links that expire."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text, update
from typer.testing import CliRunner

from hepato.common import tenants
from hepato.common.db import get_engine
from hepato.common.settings import Settings, get_settings
from hepato.common.tables import ApiKey, Batch, IdempotencyRecord, Job
from tests.conftest import SAMPLES
from tests.e2e import conftest as e2e

pytestmark = pytest.mark.slow

# The end-to-end fixtures (real services, a clean database per test) serve here too;
# pytest finds fixtures by the module attributes that hold them.
base_settings = e2e.base_settings
settings = e2e.settings

PNG = SAMPLES / "synthetic_00.png"
OTHER_PNG = SAMPLES / "synthetic_01.png"
OPEN_ROUTES = {"/v1/models"}

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


# --- Idempotency-Key ----------------------------------------------------------------


def test_a_replayed_submission_returns_the_first_answer_and_creates_nothing(
    client: TestClient, engine: Engine, key_of: Callable[[str], str]
) -> None:
    headers = {**bearer(key_of("lab")), "Idempotency-Key": "upload-42"}
    first = client.post("/v1/batches", files=files(PNG, OTHER_PNG), headers=headers)
    again = client.post("/v1/batches", files=files(PNG, OTHER_PNG), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert (count(engine, Batch), count(engine, Job)) == (1, 2)

    single = {**headers, "Idempotency-Key": "one-image"}
    job = [client.post("/v1/jobs", files=one(), headers=single) for _ in range(3)]
    assert {r.status_code for r in job} == {202} and job[0].json() == job[2].json()
    assert count(engine, Job) == 3

    # Keys are per tenant: another tenant's same key is its own request.
    other = {**bearer(key_of("other-lab")), "Idempotency-Key": "upload-42"}
    theirs = client.post("/v1/batches", files=files(PNG, OTHER_PNG), headers=other)
    assert theirs.status_code == 202 and theirs.json()["batch_id"] != first.json()["batch_id"]


def test_the_same_key_for_a_different_request_is_422(
    client: TestClient, engine: Engine, key_of: Callable[[str], str]
) -> None:
    headers = {**bearer(key_of("lab")), "Idempotency-Key": "k1"}
    assert client.post("/v1/batches", files=files(PNG), headers=headers).status_code == 202
    renamed = [("files", ("renamed.png", PNG.read_bytes(), "image/png"))]
    other_bytes = [("files", (PNG.name, OTHER_PNG.read_bytes(), "image/png"))]
    for different in (
        {"files": files(OTHER_PNG)},
        {"files": other_bytes},
        {"files": renamed},
        {"files": files(PNG, PNG)},
        {"files": files(PNG), "data": {"priority": "urgent"}},
    ):
        response = client.post("/v1/batches", headers=headers, **different)
        assert response.status_code == 422, (different, response.text)
        assert "different request" in response.json()["detail"]
    assert client.post("/v1/jobs", files=one(), headers=headers).status_code == 422
    assert (count(engine, Batch), count(engine, Job)) == (1, 1)
    # Only bytes and fields count, not the multipart framing: another boundary replays.
    body = files(PNG)
    replay = client.post("/v1/batches", files=body, headers=headers)
    assert replay.status_code == 202 and replay.headers.get("Idempotent-Replayed") == "true"


def test_a_duplicate_while_the_first_is_in_progress_is_409(
    client: TestClient, engine: Engine, key_of: Callable[[str], str]
) -> None:
    from hepato.gateway.idempotency import IN_PROGRESS

    headers = {**bearer(key_of("lab")), "Idempotency-Key": "busy"}

    def post(_: int = 0) -> Any:  # starlette may answer with httpx2 objects
        return client.post("/v1/batches", files=files(PNG, OTHER_PNG), headers=headers)

    # Six identical requests at once: whichever inserts the key first runs; the others
    # see it in progress (409) or, once it has finished, get its answer.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    codes = Counter(r.status_code for r in answers)
    assert set(codes) <= {202, 409} and codes[202] >= 1, codes
    assert len({r.json()["batch_id"] for r in answers if r.status_code == 202}) == 1
    assert (count(engine, Batch), count(engine, Job)) == (1, 2), codes

    # Deterministically: the key's row as it stands while the first request is running.
    with engine.begin() as conn:
        conn.execute(
            update(IdempotencyRecord).values(state=IN_PROGRESS, status_code=None, response=None)
        )
    busy = post()
    assert busy.status_code == 409 and "in progress" in busy.json()["detail"]
    assert (count(engine, Batch), count(engine, Job)) == (1, 2)


def test_a_failed_submission_frees_its_key_and_keys_expire(
    make_client: MakeClient, engine: Engine, key_of: Callable[[str], str]
) -> None:
    client = make_client(idempotency_ttl_s=1.0)
    headers = {**bearer(key_of("lab")), "Idempotency-Key": "retry-me"}
    junk = [("files", ("notes.txt", b"not an image", "text/plain"))]
    assert client.post("/v1/batches", files=junk, headers=headers).status_code == 422
    first = client.post("/v1/batches", files=files(PNG), headers=headers)
    assert first.status_code == 202, "nothing was kept of the 422, so its key is free"

    time.sleep(1.5)
    later = client.post("/v1/batches", files=files(PNG), headers=headers)
    assert later.status_code == 202 and "Idempotent-Replayed" not in later.headers
    assert later.json()["batch_id"] != first.json()["batch_id"], "an expired key is new"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(IdempotencyRecord)).scalar_one() == 1


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
