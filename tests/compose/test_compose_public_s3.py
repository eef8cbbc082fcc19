"""docker-compose.yml gives presigned image links an address clients reach: MinIO's S3 port
is published, and HEPATO_S3_PUBLIC_ENDPOINT names it (minio:9000 resolves only inside the
compose network)."""

from __future__ import annotations

import os
import re
from unittest import mock

from hepato.common.settings import Settings
from tests.compose.test_compose import compose, env_of, services

DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def with_defaults(value: str) -> str:
    """The value as compose interpolates it when the variable is not set."""
    return DEFAULTED.sub(lambda m: m.group(2), value)


def test_links_name_minios_published_port() -> None:
    shared = compose()["x-hepato-env"]
    assert "HEPATO_S3_PUBLIC_ENDPOINT" in shared, "links would name minio:9000"
    env = {key: with_defaults(str(value)) for key, value in shared.items()}
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings(_env_file=None)
    assert settings.s3_endpoint == "minio:9000"
    assert settings.s3_public_endpoint == "localhost:9000"
    assert settings.s3_public_secure is False

    published = [with_defaults(str(p)) for p in services()["minio"].get("ports", [])]
    assert published == ["127.0.0.1:9000:9000"], "loopback by default, the port links name"
    host_port = published[0].rsplit(":", 1)[0].rsplit(":", 1)[1]
    assert settings.s3_public_endpoint.endswith(f":{host_port}")
    assert env_of(services()["gateway"])["HEPATO_S3_PUBLIC_ENDPOINT"] == str(
        shared["HEPATO_S3_PUBLIC_ENDPOINT"]
    )
