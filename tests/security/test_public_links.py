"""Presigned image links name the address clients reach (HEPATO_S3_PUBLIC_ENDPOINT), signed
for that host, on the real S3 server: the services reach it as 127.0.0.1, clients as
localhost, and both are the same server."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from tests.security import auth
from tests.security.auth import PNG, MakeClient, bearer, one

pytestmark = pytest.mark.slow

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of


def image_link(client: TestClient, key: str) -> str:
    headers = bearer(key)
    job = client.post("/v1/jobs", files=one(), headers=headers).json()
    link = client.get(f"/v1/jobs/{job['job_id']}/image_url", headers=headers)
    assert link.status_code == 200, link.text
    return str(link.json()["url"])


def public_of(settings: Settings) -> str:
    host, port = settings.s3_endpoint.rsplit(":", 1)
    assert host == "127.0.0.1", "the test stack's S3 listens on loopback"
    return f"localhost:{port}"


def test_a_link_names_the_public_address_and_downloads_there(
    settings: Settings, make_client: MakeClient, key_of: Callable[[str], str]
) -> None:
    public = public_of(settings)
    client = make_client(s3_public_endpoint=public)
    url = image_link(client, key_of("lab"))
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("http", public), url

    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200, fetched.text[:300]
    assert fetched.content == PNG.read_bytes()

    # Signed for the public host: the same link sent to the internal one is refused, which
    # is why the link is signed by a client of the public address, not rewritten.
    internal = url.replace(f"//{public}/", f"//{settings.s3_endpoint}/", 1)
    assert internal != url
    refused = httpx.get(internal, timeout=10)
    assert refused.status_code == 403, (refused.status_code, refused.text[:300])


def test_without_it_a_link_names_the_services_address(
    settings: Settings, make_client: MakeClient, key_of: Callable[[str], str]
) -> None:
    url = image_link(make_client(), key_of("lab"))
    assert urlsplit(url).netloc == settings.s3_endpoint, url
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.content == PNG.read_bytes()


def test_signing_never_contacts_the_public_address(settings: Settings) -> None:
    # Not resolvable (.invalid is reserved): a region lookup or any request there would
    # fail, and presigning must not need one.
    store = ObjectStore(
        settings.model_copy(
            update={"s3_public_endpoint": "s3.lab.invalid", "s3_public_secure": True}
        )
    )
    url = store.presigned_url("uploads/x.png", 60)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "s3.lab.invalid",
        f"/{settings.s3_bucket}/uploads/x.png",
    )
    assert f"%2F{settings.s3_region}%2Fs3%2F" in url, "signed with the configured region"
    # The services' own client still talks to the internal address.
    assert store.client._base_url.host == settings.s3_endpoint


def test_https_alone_keeps_the_internal_host(settings: Settings) -> None:
    """A TLS proxy on the store's own name: only the scheme of the links changes."""
    store = ObjectStore(settings.model_copy(update={"s3_public_secure": True}))
    parts = urlsplit(store.presigned_url("uploads/x.png", 60))
    assert (parts.scheme, parts.netloc) == ("https", settings.s3_endpoint)


@pytest.mark.parametrize(
    "value", ["https://s3.lab.example", "http://localhost:9000", "s3.lab.example/minio"]
)
def test_the_public_endpoint_is_host_and_port_only(value: str) -> None:
    with pytest.raises(ValidationError, match="host\\[:port\\], without scheme or path"):
        Settings(s3_public_endpoint=value)


def test_an_empty_public_endpoint_is_the_internal_one() -> None:
    settings = Settings(s3_public_endpoint="  ")
    assert settings.s3_public_endpoint == ""
    store = ObjectStore(settings)
    assert store.signer is store.client
