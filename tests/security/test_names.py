"""The README's "names are cut at 1,024 characters", on the real services: a longer
filename is stored, shown and listed as 1,024 characters (the cut marked with an
ellipsis), on every upload route, while the object it names is the whole upload. A name
so long that its part header passes python-multipart's limit (4,224 bytes a line) is
refused with the whole request, 400, and nothing of it kept."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from tests.e2e import conftest as e2e
from tests.e2e.test_pipeline import db_jobs
from tests.security.files import encode

pytestmark = pytest.mark.slow

client = e2e.client
PNG = encode("PNG")
LIMIT = 1024


def long_name(chars: int, tag: str, fill: str) -> str:
    return (tag + fill * chars)[: chars - 4] + ".png"


# Two-byte characters too: the cut counts characters, not bytes.
@pytest.mark.parametrize(
    ("length", "fill"),
    [(LIMIT - 1, "n"), (LIMIT, "n"), (LIMIT + 1, "n"), (4000, "n"), (2000, "\u00e9")],
)
def test_a_name_is_cut_at_1024_characters(
    client: TestClient, settings: Settings, length: int, fill: str
) -> None:
    name = long_name(length, f"n{length}-", fill)
    assert len(name) == length
    single = client.post("/v1/jobs", files={"file": (name, PNG, "image/png")})
    batch = client.post("/v1/batches", files=[("files", (name, PNG, "image/png"))])
    assert single.status_code == batch.status_code == 202, (single.text, batch.text)
    want = name if length <= LIMIT else name[: LIMIT - 1] + "\u2026"
    shown = [single.json()["filename"], batch.json()["jobs"][0]["filename"]]
    assert shown == [want, want]
    assert all(len(s) <= LIMIT for s in shown)
    jobs = db_jobs(settings)
    assert [j.filename for j in jobs] == [want, want]
    # Listed and looked up as stored, and the object is the upload, whole.
    for job in jobs:
        got = client.get(f"/v1/jobs/{job.id}").json()
        assert got["filename"] == want
        assert ObjectStore(settings).get(job.object_key) == PNG
    listed = client.get(batch.json()["status_url"]).json()["jobs"]
    assert [j["filename"] for j in listed] == [want]


def test_a_name_past_the_multipart_header_limit_is_refused_whole(
    client: TestClient, settings: Settings
) -> None:
    name = long_name(5000, "huge-", "n")
    ok = ("fine.png", PNG, "image/png")
    response = client.post(
        "/v1/batches", files=[("files", ok), ("files", (name, PNG, "image/png"))]
    )
    assert response.status_code == 400, response.text
    assert db_jobs(settings) == []
