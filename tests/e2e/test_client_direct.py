"""The Python client's, ``hepato submit``'s and the bench clients' direct uploads
(``direct=True``, ``--direct``, ``--upload direct``) against a real gateway (uvicorn,
keys required but for the bench's), the real S3 server and a worker thread: the files go
to the store, not through the gateway, and finish as a multipart submission's do."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from hepato.bench import load, uploads
from hepato.bench.options import Upload
from hepato.cli.main import app as cli_app
from hepato.client import AsyncHepatoClient, HepatoAPIError, HepatoClient
from hepato.common.db import get_engine
from hepato.common.results import DetectResult
from hepato.common.settings import Settings
from hepato.common.tables import Job
from tests.conftest import SAMPLES
from tests.e2e import test_client
from tests.e2e.conftest import image_dir
from tests.server import serve

pytestmark = pytest.mark.slow

# Fixtures are found by the module attributes that hold them.
gateway = test_client.gateway
worker = test_client.worker


def object_keys(settings: Settings) -> list[str]:
    with get_engine(settings.database_url).connect() as conn:
        return list(conn.execute(select(Job.object_key)).scalars())


def test_sync_and_async_clients_upload_directly_and_finish(
    gateway: tuple[str, str], worker: None, settings: Settings, tmp_path: Path
) -> None:
    url, key = gateway
    folder = image_dir(tmp_path, 7)
    uploaded: list[Path] = []
    with HepatoClient(url, key) as client:
        refs = client.submit(folder, batch_size=4, on_uploaded=uploaded.append, direct=True)
        assert [r.accepted for r in refs] == [4, 3] and not any(r.rejected for r in refs)
        assert sorted(uploaded) == sorted(folder.rglob("*.png"))
        finals = [client.wait(r.batch_id, timeout=60) for r in refs]
        jobs = [j for r in refs for j in client.results(r.batch_id)]
    assert all(b.state == "done" for b in finals)
    assert {j.filename for j in jobs} == {p.name for p in folder.rglob("*.png")}
    assert sum(len(j.result.boxes) for j in jobs if isinstance(j.result, DetectResult)) > 0
    keys = object_keys(settings)
    assert len(keys) == 7 and all(k.startswith("direct/") and "/lab-a/" in k for k in keys)

    async def submit_async() -> int:
        async with AsyncHepatoClient(url, key) as aclient:
            [ref] = await aclient.submit(folder / "more", direct=True)
            return ref.accepted

    assert anyio.run(submit_async) == 3
    assert len(object_keys(settings)) == 10


def test_a_refused_direct_batch_raises_as_a_multipart_one_does(
    gateway: tuple[str, str], tmp_path: Path
) -> None:
    url, key = gateway
    bad = tmp_path / "bad.png"
    bad.write_text("<html>not an image</html>")
    with HepatoClient(url, key) as client, pytest.raises(HepatoAPIError) as refused:
        client.submit([bad], direct=True)
    assert refused.value.status_code == 422 and refused.value.submitted == []
    assert "no upload of this request is an accepted image" in str(refused.value.detail)


def test_cli_submit_direct(gateway: tuple[str, str], worker: None, tmp_path: Path) -> None:
    url, key = gateway
    folder = image_dir(tmp_path, 5)
    auth = ["--url", url, "--api-key", key]
    args = ["submit", str(folder), "--direct", "--batch-size", "3", "--wait", *auth]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "5 jobs: 5 done" in result.stdout


@pytest.mark.parametrize("upload", ["multipart", "direct"])
def test_the_bench_clients_submit_either_way(settings: Settings, upload: Upload) -> None:
    from hepato.gateway.app import create_app

    images = load.cycle(load.load_images(SAMPLES), 3)

    async def submit(base: str) -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            batch = await uploads.post_batch(client, images[:2], "null", upload)
            job = await uploads.post_job(client, images[2], "null", upload)
            return batch.status_code, job.status_code

    with serve(create_app(settings)) as url:
        assert anyio.run(submit, url) == (202, 202)
    keys = object_keys(settings)
    assert len(keys) == 3 and all(k.startswith("direct/") == (upload == "direct") for k in keys)
