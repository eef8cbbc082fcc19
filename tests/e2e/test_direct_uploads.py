"""Direct uploads on the real services: files PUT on presigned URLs to the real S3 server,
committed through the gateway in-process; the gateway reads headers only, by range; bad
uploads are refused by key and make no job; a commit replays under its Idempotency-Key
and cannot be made twice; uploads never committed are swept, committed ones are not."""

from __future__ import annotations

import io
import struct
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from hepato.common import direct_uploads
from hepato.common.db import get_engine
from hepato.common.direct_uploads import Swept
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow

PNG = SAMPLES / "synthetic_00.png"
JPEG = SAMPLES / "synthetic_00.jpg"
BIG_PNG = SAMPLES / "ihc_colon.png"  # 467 kB: far more than a header


def sign(client: TestClient, count: int, **headers: str) -> list[dict[str, Any]]:
    response = client.post("/v1/uploads", json={"count": count}, headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["uploads"])


def put(ticket: dict[str, Any], data: bytes, content_type: str = "image/png") -> None:
    response = httpx.put(ticket["url"], content=data, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def staged(key: str) -> direct_uploads.StagedKey:
    parsed = direct_uploads.parse_key(key)
    assert parsed is not None, key
    return parsed


def jobs_in_db(settings: Settings) -> int:
    with get_engine(settings.database_url).connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Job)).scalar_one())


def store_of(settings: Settings) -> ObjectStore:
    return ObjectStore(settings)


def test_a_direct_upload_finishes_with_the_result_of_the_same_image_sent_multipart(
    client: TestClient, settings: Settings, run_worker: Callable[..., object]
) -> None:
    data = PNG.read_bytes()
    multipart = client.post("/v1/jobs", files={"file": (PNG.name, data, "image/png")})
    assert multipart.status_code == 202, multipart.text
    [ticket] = sign(client, 1)
    put(ticket, data)
    direct = client.post("/v1/uploads/jobs", json={"upload": {"key": ticket["key"]}})
    assert direct.status_code == 202, direct.text
    # The key names the job the upload became; the job reads the staged object in place.
    assert direct.json()["job_id"] == str(staged(ticket["key"]).job_id)
    run_worker()
    one, other = (client.get(f"/v1/jobs/{r.json()['job_id']}").json() for r in (multipart, direct))
    assert one["state"] == other["state"] == "done", (one, other)
    assert one["result"] == other["result"] and one["result"]["boxes"]
    assert (one["width"], one["height"]) == (other["width"], other["height"])
    assert client.get(f"/v1/jobs/{other['id']}/image").content == data


def test_the_gateway_reads_only_headers_by_range_and_never_the_bytes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    reads: list[tuple[str, int, int]] = []
    real_read_range = ObjectStore.read_range

    def spy(self: ObjectStore, key: str, offset: int, length: int) -> tuple[bytes, int, str]:
        reads.append((key, offset, length))
        return real_read_range(self, key, offset, length)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the gateway touched an image's bytes")

    big_jpeg = tmp_path / "colon.jpg"
    Image.open(BIG_PNG).convert("RGB").save(big_jpeg, "JPEG", quality=95)
    tickets = sign(client, 2)
    files = {tickets[0]["key"]: BIG_PNG, tickets[1]["key"]: big_jpeg}
    put(tickets[0], BIG_PNG.read_bytes())
    put(tickets[1], big_jpeg.read_bytes(), "image/jpeg")
    monkeypatch.setattr(ObjectStore, "read_range", spy)
    for name in ("get", "put_file", "download_to"):
        monkeypatch.setattr(ObjectStore, name, never)
    body = {"uploads": [{"key": k, "filename": p.name} for k, p in files.items()]}
    response = client.post("/v1/uploads/batches", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 2 and not response.json()["rejected"]
    for key, path in files.items():
        mine = [(offset, length) for k, offset, length in reads if k == key]
        assert mine and mine[0][0] == 0, reads
        assert sum(length for _, length in mine) < path.stat().st_size / 2, (path, mine)
    # Sizes and dimensions are those of the files, read from headers only.
    page = client.get(f"/v1/batches/{response.json()['batch_id']}").json()
    found = {j["filename"]: (j["width"], j["height"]) for j in page["jobs"]}
    assert found == {p.name: Image.open(p).size for p in files.values()}


def test_a_tiff_whose_directory_is_at_its_end_is_read_there_by_range(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiff_with_ifd_last(300, 200)
    [ticket] = sign(client, 1)
    put(ticket, data, "image/tiff")
    reads: list[tuple[int, int]] = []
    real_read_range = ObjectStore.read_range

    def spy(self: ObjectStore, key: str, offset: int, length: int) -> tuple[bytes, int, str]:
        reads.append((offset, length))
        return real_read_range(self, key, offset, length)

    monkeypatch.setattr(ObjectStore, "read_range", spy)
    response = client.post("/v1/uploads/jobs", json={"upload": {"key": ticket["key"]}})
    assert response.status_code == 202, response.text
    assert len(reads) >= 2 and sum(n for _, n in reads) < len(data) / 2, reads
    assert reads[-1][0] > 64 * 1024, "the directory was read where it lies, at the end"
    job = client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert (job["width"], job["height"]) == Image.open(io.BytesIO(data)).size == (300, 200)


def tiff_with_ifd_last(width: int, height: int) -> bytes:
    """An uncompressed RGB TIFF whose image directory follows its pixels, as many
    writers lay it out (Pillow puts it first)."""
    pixels = bytes(range(256)) * (width * height * 3 // 256 + 1)
    pixels = pixels[: width * height * 3]
    bits_at = 8 + len(pixels)  # BitsPerSample's three values
    ifd_at = bits_at + 6
    tags = [
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 3, bits_at),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 8),
        (277, 3, 1, 3),
        (278, 3, 1, height),
        (279, 4, 1, len(pixels)),
    ]
    ifd = struct.pack("<H", len(tags))
    ifd += b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    header = b"II*\x00" + struct.pack("<I", ifd_at)
    return header + pixels + struct.pack("<HHH", 8, 8, 8) + ifd


def test_bad_uploads_are_refused_by_key_and_make_no_job(
    client: TestClient, settings: Settings
) -> None:
    missing, text, good, wrong_type = sign(client, 4)
    put(text, b"just some text, not an image at all")
    put(good, JPEG.read_bytes(), "image/jpeg")
    put(wrong_type, PNG.read_bytes(), "text/html")
    body = {"uploads": [{"key": t["key"]} for t in (missing, text, good, wrong_type)]}
    response = client.post("/v1/uploads/batches", json=body)
    assert response.status_code == 202, response.text
    refused = {r["filename"]: (r["status_code"], r["error"]) for r in response.json()["rejected"]}
    assert refused[missing["key"]][0] == 404 and "PUT the file" in refused[missing["key"]][1]
    assert refused[text["key"]] == (415, refused[text["key"]][1])
    assert "not an accepted image format" in refused[text["key"]][1]
    assert refused[wrong_type["key"]][0] == 415 and "text/html" in refused[wrong_type["key"]][1]
    assert [j["filename"] for j in response.json()["jobs"]] == [good["key"]]
    assert jobs_in_db(settings) == 1

    # All refused: a 422 listing them, and nothing made.
    nothing = client.post("/v1/uploads/batches", json={"uploads": [{"key": missing["key"]}]})
    assert nothing.status_code == 422 and nothing.json()["rejected"][0]["status_code"] == 404
    single = client.post("/v1/uploads/jobs", json={"upload": {"key": text["key"]}})
    assert single.status_code == 415 and text["key"] in single.json()["detail"]
    assert jobs_in_db(settings) == 1


def test_too_large_is_refused_when_signed_and_when_committed(settings: Settings) -> None:
    from hepato.gateway.app import create_app

    limit = JPEG.stat().st_size + 10
    with TestClient(create_app(settings.model_copy(update={"max_file_bytes": limit}))) as client:
        declared = client.post("/v1/uploads", json={"files": [{"size": 10}, {"size": limit + 1}]})
        assert declared.status_code == 413 and "files[1]" in declared.json()["detail"]
        small, large = sign(client, 2)
        put(small, JPEG.read_bytes(), "image/jpeg")
        put(large, PNG.read_bytes())
        body = {"uploads": [{"key": small["key"]}, {"key": large["key"], "filename": "big.png"}]}
        response = client.post("/v1/uploads/batches", json=body)
        assert response.status_code == 202, response.text
        [bad] = response.json()["rejected"]
        assert (bad["filename"], bad["status_code"]) == ("big.png", 413)
        assert f"limit of {limit} bytes" in bad["error"]
    assert jobs_in_db(settings) == 1


def test_keys_not_of_uploads_refuse_the_whole_request(
    client: TestClient, settings: Settings
) -> None:
    [ticket] = sign(client, 1)
    put(ticket, JPEG.read_bytes(), "image/jpeg")
    job = client.post("/v1/jobs", files={"file": (PNG.name, PNG.read_bytes(), "image/png")})
    with get_engine(settings.database_url).connect() as conn:
        existing = conn.execute(select(Job.object_key)).scalar_one()
    for key in (existing, "direct/../uploads/x.png", f"direct/2026113015/public/{'0' * 31}"):
        body = {"uploads": [{"key": ticket["key"]}, {"key": key}]}
        response = client.post("/v1/uploads/batches", json=body)
        assert response.status_code == 422, response.text
        assert "is not a key of POST /v1/uploads" in response.json()["detail"], key
    twice = {"uploads": [{"key": ticket["key"]}, {"key": ticket["key"]}]}
    response = client.post("/v1/uploads/batches", json=twice)
    assert response.status_code == 422 and "named twice" in response.json()["detail"]
    assert jobs_in_db(settings) == 1 and job.status_code == 202


def test_a_commit_past_its_window_is_410(client: TestClient, settings: Settings) -> None:
    old = direct_uploads.new_key("public", uuid.uuid4(), datetime(2020, 1, 1, tzinfo=UTC))
    store_of(settings).put(old.key, JPEG.read_bytes(), "image/jpeg")
    response = client.post("/v1/uploads/jobs", json={"upload": {"key": old.key}})
    assert response.status_code == 410 and "commit window closed" in response.json()["detail"]
    assert jobs_in_db(settings) == 0


def test_a_commit_replays_under_its_key_and_cannot_be_made_twice(
    client: TestClient, settings: Settings
) -> None:
    tickets = sign(client, 2)
    for t in tickets:
        put(t, JPEG.read_bytes(), "image/jpeg")
    body = {"uploads": [{"key": t["key"]} for t in tickets], "priority": "urgent"}
    headers = {"Idempotency-Key": "commit-1"}
    first = client.post("/v1/uploads/batches", json=body, headers=headers)
    again = client.post("/v1/uploads/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = client.post(
        "/v1/uploads/batches", json={**body, "priority": "routine"}, headers=headers
    )
    assert other.status_code == 422 and "different request" in other.json()["detail"]
    # Without a key, a second commit of a committed upload is refused whole: one job each.
    [fresh] = sign(client, 1)
    put(fresh, JPEG.read_bytes(), "image/jpeg")
    twice = {"uploads": [{"key": fresh["key"]}, {"key": tickets[0]["key"]}]}
    response = client.post("/v1/uploads/batches", json=twice)
    assert response.status_code == 409, response.text
    assert (
        tickets[0]["key"] in response.json()["detail"]
        and fresh["key"] not in response.json()["detail"]
    )
    assert jobs_in_db(settings) == 2


def test_uploads_never_committed_are_swept_and_committed_ones_are_kept(
    client: TestClient, settings: Settings
) -> None:
    store = store_of(settings)
    store.remove([direct_uploads.WATERMARK_KEY])
    committed, abandoned, _never_put = sign(client, 3)
    put(committed, JPEG.read_bytes(), "image/jpeg")
    put(abandoned, JPEG.read_bytes(), "image/jpeg")
    response = client.post("/v1/uploads/jobs", json={"upload": {"key": committed["key"]}})
    assert response.status_code == 202, response.text
    engine = get_engine(settings.database_url)
    expiry = settings.upload_url_expiry_s

    # Within the commit window the upload is left alone (older hours of other tests go).
    direct_uploads.sweep(engine, store, expiry)
    assert store.exists(abandoned["key"]) and store.exists(committed["key"])

    commit_by = staged(committed["key"]).commit_by(expiry)
    later = commit_by + timedelta(seconds=direct_uploads.SWEEP_MARGIN_S + 1)
    swept = direct_uploads.sweep(engine, store, expiry, now=later)
    # Other tests' uploads of the hour may be swept with them: counts are at least.
    assert swept.deleted >= 1 and swept.kept >= 1 and swept.hours >= 1
    assert not store.exists(abandoned["key"]) and store.exists(committed["key"])
    # The swept hours are behind the watermark: the next pass lists nothing again.
    assert direct_uploads.sweep(engine, store, expiry, now=later).hours == 0
    job = client.get(f"/v1/jobs/{response.json()['job_id']}/image")
    assert job.status_code == 200 and job.content == JPEG.read_bytes()


def test_the_workers_sweeper_runs_the_sweep_one_process_at_a_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hepato.worker.recovery import Recovery

    passes: list[bool] = []
    monkeypatch.setattr(
        direct_uploads, "sweep", lambda *a, **k: passes.append(k["stop"] is not None) or Swept()
    )
    engine = get_engine(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url)
    stopping = threading.Event()

    # Another process holds the sweep: this one skips its pass.
    client.set(direct_uploads.LOCK_KEY, "other", ex=60)
    direct_uploads.Sweeper(settings).maybe_run(engine, client, stopping)
    assert passes == []
    client.delete(direct_uploads.LOCK_KEY)

    # The worker's sweeper thread runs it, and lets the lock go after its pass.
    recovery = Recovery(settings, engine, client, "w-direct", ["null"], stopping)
    recovery.start()
    try:
        for _ in range(200):
            if passes:
                break
            stopping.wait(0.1)
    finally:
        stopping.set()
        recovery.stop()
    assert passes == [True] and not client.exists(direct_uploads.LOCK_KEY)


def test_a_pass_sweeps_at_most_its_hours_and_the_next_goes_on(settings: Settings) -> None:
    store = store_of(settings)
    store.remove([direct_uploads.WATERMARK_KEY])
    first, second = (
        direct_uploads.new_key("public", uuid.uuid4(), datetime(2019, 1, 1, h, tzinfo=UTC))
        for h in (0, 1)
    )
    for old in (first, second):
        store.put(old.key, b"never committed", "image/png")
    engine, expiry = get_engine(settings.database_url), settings.upload_url_expiry_s
    assert direct_uploads.sweep(engine, store, expiry, max_hours=1).hours == 1
    assert not store.exists(first.key) and store.exists(second.key)
    direct_uploads.sweep(engine, store, expiry, max_hours=1)
    assert not store.exists(second.key)
