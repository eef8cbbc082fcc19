"""Idempotency-Key on submissions, on real Postgres, Redis and S3: a replay returns the
first answer, a different request under the same key is 422, a duplicate in flight is
409, and keys are freed by failures and expire."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, update

from hepato.common.tables import Batch, IdempotencyRecord, Job
from tests.security import auth
from tests.security.auth import OTHER_PNG, PNG, MakeClient, bearer, count, files, one

pytestmark = pytest.mark.slow

# Fixtures are found by the module attributes that hold them.
engine = auth.engine
make_client = auth.make_client
client = auth.client
key_of = auth.key_of


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
