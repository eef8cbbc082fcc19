"""The audit trail on the real services: every submission, cancel and read of a job,
batch, image, export or event stream leaves exactly one ``audit_events`` row naming the
tenant, the key's id, the client and the object; health, metrics and the model list leave
none, nor does a refused call; no row holds the key, an image's bytes or a file name; the
service's own engine cannot change or remove a row; ``hepato audit`` lists them."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from hepato.common import tenants
from hepato.common.settings import Settings, get_settings
from hepato.common.tables import AuditEvent
from tests.conftest import SAMPLES
from tests.security import auth
from tests.security.auth import MakeClient, bearer

engine = auth.engine
make_client = auth.make_client

# File names as a client may send them: a patient's name in them must reach no audit row.
PATIENT = "Jane-Doe-1962"
PNG, OTHER = SAMPLES / "synthetic_00.png", SAMPLES / "synthetic_01.png"
Row = tuple[str, str | None, str | None]  # action, object type, object id


def mark(engine: Engine) -> int:
    """The last row's id now: a test's own rows come after it (rows outlive each test's
    reset, as nothing may delete them)."""
    with engine.connect() as conn:
        return conn.execute(select(func.coalesce(func.max(AuditEvent.id), 0))).scalar_one()


def audit_rows(engine: Engine, after: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(
            select(AuditEvent.__table__).where(AuditEvent.id > after).order_by(AuditEvent.id)
        )
        return [dict(r._mapping) for r in found]


def brief(rows: list[dict[str, Any]]) -> list[Row]:
    return [
        (r["action"], r["object_type"], str(r["object_id"]) if r["object_id"] else None)
        for r in rows
    ]


def upload(name: str, path: Any = PNG) -> tuple[str, bytes, str]:
    return (f"{PATIENT}-{name}.png", path.read_bytes(), "image/png")


def test_each_call_leaves_one_row_naming_who_and_what(
    make_client: MakeClient, engine: Engine, run_worker: Callable[..., object]
) -> None:
    # /v1/predict stops waiting at once: its submission is what is audited.
    client = make_client(detect_timeout_s=0.2)
    a = tenants.create_key(engine, "audit-a")
    b = tenants.create_key(engine, "audit-b")
    ha, hb = bearer(a.key), bearer(b.key)
    start = mark(engine)
    expected: list[Row] = []

    def ok(response: Any, code: int = 200) -> dict[str, Any]:
        assert response.status_code == code, response.text
        return response.json() if "json" in response.headers.get("content-type", "") else {}

    batch = ok(
        client.post(
            "/v1/batches",
            files=[
                ("files", upload("a")),
                ("files", upload("b", OTHER)),
                ("files", (f"{PATIENT}-notes.png", b"not an image", "image/png")),
            ],
            headers=ha,
        ),
        202,
    )
    batch_id = batch["batch_id"]
    expected.append(("submit", "batch", batch_id))
    assets = ok(client.post("/v1/assets", files=[("files", upload("c"))], headers=ha), 202)
    expected.append(("submit", "batch", assets["batch_id"]))
    job_id = ok(client.post("/v1/jobs", files={"file": upload("d")}, headers=ha), 202)["job_id"]
    expected.append(("submit", "job", job_id))
    for path in ("/v1/predict", "/v1/detect"):
        waited = ok(client.post(path, files={"file": upload("e")}, headers=ha), 202)
        expected.append(("submit", "job", waited["job_id"]))
    run_worker()

    batch_job = ok(client.get(f"/v1/batches/{batch_id}", headers=ha))["jobs"][0]["id"]
    expected.append(("read_batch", "batch", batch_id))
    assert ok(client.get(f"/v1/jobs/{job_id}", headers=ha))["state"] == "done"
    expected.append(("read_job", "job", job_id))
    image_bytes = client.get(f"/v1/jobs/{job_id}/image", headers=ha).content
    assert image_bytes == PNG.read_bytes()
    expected.append(("read_image", "job", job_id))
    ok(client.get(f"/v1/jobs/{job_id}/image_url", headers=ha))
    expected.append(("read_image_url", "job", job_id))
    ok(client.get(f"/v1/jobs/{job_id}/export", params={"format": "csv"}, headers=ha))
    expected.append(("export", "job", job_id))
    ok(client.get(f"/v1/batches/{batch_id}/export", params={"format": "coco"}, headers=ha))
    expected.append(("export", "batch", batch_id))
    ok(client.get(f"/v1/jobs/{batch_job}/events", headers=ha))
    expected.append(("watch", "job", batch_job))
    ok(client.get(f"/v1/batches/{batch_id}/events", headers=ha))
    expected.append(("watch", "batch", batch_id))

    pending = ok(client.post("/v1/jobs", files={"file": upload("f")}, headers=ha), 202)["job_id"]
    expected.append(("submit", "job", pending))
    assert ok(client.delete(f"/v1/jobs/{pending}", headers=ha))["canceled"] == 1
    expected.append(("cancel", "job", pending))
    ok(client.delete(f"/v1/batches/{batch_id}", headers=ha))
    expected.append(("cancel", "batch", batch_id))

    # No row: the open routes, and every refused call (no key, another tenant's id, a
    # batch of no image, a job that can no longer be canceled).
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}/image", headers=hb).status_code == 404
    assert client.get(f"/v1/batches/{batch_id}/export", headers=hb).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=hb).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=ha).status_code == 409
    refused = [("files", (f"{PATIENT}.png", b"nope", "image/png"))]
    assert client.post("/v1/batches", files=refused, headers=ha).status_code == 422

    rows = audit_rows(engine, start)
    assert brief(rows) == expected
    assert {(r["tenant"], r["key_id"], r["client"]) for r in rows} == {
        ("audit-a", a.key_id, "testclient")
    }
    assert rows[0]["detail"] == {"accepted": 2, "rejected": 1}
    assert rows[3]["detail"] == {"accepted": 1, "rejected": 0, "wait": True}
    assert {r["detail"]["format"] for r in rows if r["action"] == "export"} == {"csv", "coco"}
    assert all(r["at"] is not None for r in rows)

    # Nothing a client sent, nor the key, in any row.
    dumped = json.dumps([{k: str(v) for k, v in r.items()} for r in rows])
    for secret in (PATIENT, ".png", a.key, tenants.hash_key(a.key), b.key_id):
        assert secret not in dumped, secret
    assert all(len(json.dumps(r["detail"])) < 120 for r in rows)


def test_the_open_mode_names_the_public_tenant_and_no_key(
    client: TestClient, settings: Settings
) -> None:
    from hepato.common.db import get_engine

    db = get_engine(settings.database_url)
    start = mark(db)
    # An Idempotency-Key replay creates nothing, and leaves no row of its own.
    once = {"Idempotency-Key": "audit-open-1"}
    first = client.post("/v1/jobs", files={"file": upload("open")}, headers=once)
    again = client.post("/v1/jobs", files={"file": upload("open")}, headers=once)
    assert again.headers.get("Idempotent-Replayed") == "true"
    job_id = first.json()["job_id"]
    assert again.json()["job_id"] == job_id
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    rows = audit_rows(db, start)
    assert brief(rows) == [("submit", "job", job_id), ("read_job", "job", job_id)]
    assert {(r["tenant"], r["key_id"]) for r in rows} == {(tenants.PUBLIC_TENANT, None)}


def test_the_service_cannot_change_or_remove_a_row(make_client: MakeClient, engine: Engine) -> None:
    client = make_client()
    key = tenants.create_key(engine, "audit-c")
    start = mark(engine)
    job_id = client.post("/v1/jobs", files={"file": upload("g")}, headers=bearer(key.key))
    assert job_id.status_code == 202, job_id.text
    [row] = audit_rows(engine, start)

    # The gateway's own engine (the service's role and pool) is refused, by the trigger.
    statements = (
        "UPDATE audit_events SET tenant = 'someone-else' WHERE id = :id",
        "UPDATE audit_events SET detail = '{}' WHERE id = -1",  # no row matched: still refused
        "DELETE FROM audit_events WHERE id = :id",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    )
    for statement in statements:
        with pytest.raises(DBAPIError) as refused, engine.begin() as conn:
            conn.execute(text(statement), {"id": row["id"]})
        assert refused.value.orig is not None
        assert getattr(refused.value.orig, "sqlstate", None) == "42501", statement
        assert "audit_events is append-only" in str(refused.value.orig), statement
    # Not even through a TRUNCATE of the tables it would cascade from.
    with pytest.raises(DBAPIError), engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, audit_events CASCADE"))
    assert audit_rows(engine, start) == [row]


def test_the_cli_lists_a_tenants_rows_by_time_action_and_object(
    make_client: MakeClient,
    engine: Engine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hepato.cli.main import app

    client = make_client()
    d, e = tenants.create_key(engine, "audit-d"), tenants.create_key(engine, "audit-e")
    before = datetime.now(UTC) - timedelta(seconds=1)
    start = mark(engine)
    mine = client.post("/v1/jobs", files={"file": upload("h")}, headers=bearer(d.key))
    job_id = mine.json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(d.key)).status_code == 200
    theirs = client.post("/v1/jobs", files={"file": upload("i")}, headers=bearer(e.key))
    assert theirs.status_code == 202
    rows = audit_rows(engine, start)
    assert len(rows) == 3

    monkeypatch.setenv("HEPATO_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()

        def audit(*args: str) -> list[dict[str, Any]]:
            done = runner.invoke(app, ["audit", "--tenant", "audit-d", *args, "--json"])
            assert done.exit_code == 0, done.output
            return [json.loads(line) for line in done.stdout.splitlines()]

        since = before.isoformat()
        listed = audit("--since", since)
        assert [(r["action"], r["object_id"]) for r in listed] == [
            ("submit", job_id),
            ("read_job", job_id),
        ]
        assert {(r["tenant"], r["key_id"]) for r in listed} == {("audit-d", d.key_id)}
        assert audit("--since", since, "--action", "read_job")[0]["id"] == rows[1]["id"]
        assert len(audit("--since", since, "--object", job_id)) == 2
        assert audit("--since", since, "--limit", "1")[0]["action"] == "submit"
        # A window that ends before the calls, or starts after them, holds none of them.
        assert all(r["id"] <= start for r in audit("--since", "2020-01-01", "--until", since))
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert audit("--since", later) == []

        table = runner.invoke(app, ["audit", "--tenant", "audit-d", "--since", since[:10]])
        assert table.exit_code == 0, table.output
        assert "read_job" in table.stdout and d.key_id in table.stdout
        assert e.key_id not in table.stdout
        bad = runner.invoke(app, ["audit", "--tenant", "audit-d", "--since", "yesterday"])
        assert bad.exit_code != 0 and "ISO 8601" in bad.output
        bad = runner.invoke(
            app, ["audit", "--tenant", "audit-d", "--since", since, "--object", "x"]
        )
        assert bad.exit_code != 0 and "not a job, batch or slide id" in bad.output
    finally:
        get_settings.cache_clear()


def test_the_migration_downgrades_and_upgrades(settings: Settings, engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    from hepato.common.migrate import migrations_dir

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = settings.database_url

    def present() -> tuple[bool, bool]:
        with engine.connect() as conn:
            table = conn.execute(text("SELECT to_regclass('audit_events')")).scalar()
            trigger = conn.execute(
                text("SELECT count(*) FROM pg_trigger WHERE tgname = 'audit_events_append_only'")
            ).scalar_one()
        return table is not None, trigger == 1

    try:
        command.downgrade(config, "0010")
        assert present() == (False, False)
    finally:
        command.upgrade(config, "head")
    assert present() == (True, True)
