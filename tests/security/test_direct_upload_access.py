"""Direct uploads with API keys required: signing and committing need a key; a tenant
cannot commit (nor learn of) another tenant's upload; the PUT URLs name the public S3
address when one is set, are signed for it, and the upload put there commits."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import Engine

from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from tests.security import auth
from tests.security.auth import PNG, MakeClient, bearer, count
from tests.security.test_public_links import public_of

pytestmark = pytest.mark.slow

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of


def test_signing_and_committing_need_a_key(make_client: MakeClient) -> None:
    client = make_client()
    assert client.post("/v1/uploads", json={"count": 1}).status_code == 401
    body = {"upload": {"key": "direct/2026113015/lab/" + "0" * 32}}
    assert client.post("/v1/uploads/jobs", json=body).status_code == 401


def test_another_tenants_upload_is_not_found_and_stays_its_owners(
    settings: Settings, make_client: MakeClient, key_of: Callable[[str], str], engine: Engine
) -> None:
    client = make_client()
    owner, other = bearer(key_of("lab-a")), bearer(key_of("lab-b"))
    signed = client.post("/v1/uploads", json={"count": 1}, headers=owner)
    [ticket] = signed.json()["uploads"]
    assert "/lab-a/" in ticket["key"]
    assert httpx.put(ticket["url"], content=PNG.read_bytes()).status_code == 200
    body = {"upload": {"key": ticket["key"]}}

    stolen = client.post("/v1/uploads/jobs", json=body, headers=other)
    assert stolen.status_code == 404, stolen.text
    assert "no upload under this key" in stolen.json()["detail"]
    batch = client.post("/v1/uploads/batches", json={"uploads": [body["upload"]]}, headers=other)
    assert batch.status_code == 422 and batch.json()["rejected"][0]["status_code"] == 404
    assert count(engine, Job) == 0
    # A key of no upload reads the same: the other tenant learns nothing.
    never_put = ticket["key"].replace("/lab-a/", "/lab-b/")
    nothing = client.post("/v1/uploads/jobs", json={"upload": {"key": never_put}}, headers=other)
    assert nothing.status_code == 404
    assert nothing.json()["detail"] == stolen.json()["detail"].replace(ticket["key"], never_put)

    assert ObjectStore(settings).exists(ticket["key"])
    mine = client.post("/v1/uploads/jobs", json=body, headers=owner)
    assert mine.status_code == 202, mine.text
    assert client.get(f"/v1/jobs/{mine.json()['job_id']}", headers=other).status_code == 404


def test_put_urls_name_the_public_address_and_upload_there(
    settings: Settings, make_client: MakeClient, key_of: Callable[[str], str], engine: Engine
) -> None:
    public = public_of(settings)
    client = make_client(s3_public_endpoint=public)
    headers = bearer(key_of("lab"))
    [ticket] = client.post("/v1/uploads", json={"count": 1}, headers=headers).json()["uploads"]
    parts = urlsplit(ticket["url"])
    assert (parts.scheme, parts.netloc) == ("http", public), ticket["url"]
    assert parts.path == f"/{settings.s3_bucket}/{ticket['key']}"
    # Signed for the public host: the internal address refuses the same URL.
    internal = ticket["url"].replace(f"//{public}/", f"//{settings.s3_endpoint}/", 1)
    assert httpx.put(internal, content=PNG.read_bytes()).status_code == 403
    assert httpx.put(ticket["url"], content=PNG.read_bytes()).status_code == 200
    done = client.post("/v1/uploads/jobs", json={"upload": {"key": ticket["key"]}}, headers=headers)
    assert done.status_code == 202, done.text
    assert count(engine, Job) == 1
