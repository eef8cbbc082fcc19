"""Bad input at the gateway, on the real services: disguised files, decompression bombs,
truncated and corrupt images, oversized requests. Hostile filenames, metadata and form
fields are in test_upload_metadata.py."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from hepato.gateway.app import create_app
from hepato.worker.runner import Worker
from tests.e2e import conftest as e2e
from tests.e2e.test_pipeline import db_jobs
from tests.security.files import (
    MiB,
    bmp_declaring,
    encode,
    garbled,
    many_text_chunks,
    measured,
    png_declaring,
    post_batch,
    post_one,
    replace_chunk,
    set_tiff_tag,
    text_bomb,
    tiff_declaring,
)
from tests.server import serve

pytestmark = pytest.mark.slow

# Fixtures are found by the module attributes that hold them (base_settings and settings
# come from conftest.py).
client = e2e.client
models = e2e.models
run_worker = e2e.run_worker

# A bomb must be refused in well under a second, and with well under this much memory.
FAST_S = 0.5
SMALL_BYTES = 50 * MiB

MakeClient = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def make_client(settings: Settings) -> MakeClient:
    """A gateway on the test services with some settings changed."""

    @contextmanager
    def make(**overrides: object) -> Iterator[TestClient]:
        with TestClient(create_app(settings.model_copy(update=overrides))) as test_client:
            yield test_client

    return make


# --- format sniffed from the bytes --------------------------------------------------------

DISGUISED = {
    "page.png": b"<!DOCTYPE html><html><script>alert(1)</script></html>",
    "vector.png": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script/></svg>',
    "report.png": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
    "tool.png": b"\x7fELF\x02\x01\x01\x00" + bytes(56),
}


@pytest.mark.parametrize("name", sorted(DISGUISED))
def test_a_non_image_named_png_is_415(client: TestClient, settings: Settings, name: str) -> None:
    response = post_one(client, name, DISGUISED[name])
    assert response.status_code == 415, response.text
    assert response.json()["detail"].startswith(f"{name}: not an accepted image format")
    assert db_jobs(settings) == []


def test_a_batch_names_each_disguised_file_and_keeps_the_image(
    client: TestClient, settings: Settings
) -> None:
    response = post_batch(client, [("real.png", encode("PNG")), *DISGUISED.items()])
    assert response.status_code == 202, response.text
    body = response.json()
    assert [j["filename"] for j in body["jobs"]] == ["real.png"]
    assert {r["filename"]: r["status_code"] for r in body["rejected"]} == dict.fromkeys(
        DISGUISED, 415
    )
    assert [j.filename for j in db_jobs(settings)] == ["real.png"]


# --- decompression bombs ------------------------------------------------------------------

BOMBS: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "png-50000x50000": (lambda: png_declaring(50_000, 50_000), 413, "too many pixels"),
    # One pixel past HEPATO_MAX_IMAGE_PIXELS' default.
    "png-over-limit": (lambda: png_declaring(178_956_971, 1), 413, "too many pixels"),
    "tiff-100000x100000": (lambda: tiff_declaring(100_000, 100_000), 413, "too many pixels"),
    "bmp-60000x60000": (lambda: bmp_declaring(60_000, 60_000), 413, "too many pixels"),
    "png-zTXt-bomb": (lambda: text_bomb(b"zTXt"), 422, "Decompressed data too large"),
    "png-iTXt-bomb": (lambda: text_bomb(b"iTXt"), 422, "Decompressed data too large"),
    "png-iCCP-bomb": (lambda: text_bomb(b"iCCP"), 422, "Decompressed data too large"),
    "png-100-zTXt-chunks": (many_text_chunks, 422, "Too much memory used in text chunks"),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_a_bomb_is_refused_fast_in_little_memory(
    client: TestClient, settings: Settings, case: str
) -> None:
    make, status, why = BOMBS[case]
    data = make()
    post_one(client, "warm.png", encode("PNG"))  # first-request costs are not the bomb's
    with measured() as cost:
        response = post_one(client, f"{case}.png", data)
    assert response.status_code == status, response.text
    assert why in response.json()["detail"]
    assert cost.seconds < FAST_S, f"{case}: {cost}"
    assert cost.rss_growth < SMALL_BYTES and cost.traced_peak < SMALL_BYTES, f"{case}: {cost}"
    assert [j.filename for j in db_jobs(settings)] == ["warm.png"]


def test_the_pixel_limit_is_the_setting(client: TestClient, make_client: MakeClient) -> None:
    """Pillow warns at 89 M pixels; the limit is HEPATO_MAX_IMAGE_PIXELS, exactly."""
    limit = Settings().max_image_pixels
    assert post_one(client, "at-limit.png", png_declaring(limit // 10, 10)).status_code == 202
    assert post_one(client, "100M.png", png_declaring(10_000, 10_000)).status_code == 202
    with make_client(max_image_pixels=1_000_000) as small:
        response = post_one(small, "big.png", png_declaring(1000, 1001))
        assert response.status_code == 413
        assert response.json()["detail"] == (
            "big.png: image is 1000x1001 pixels, the limit is 1000000 pixels"
        )
        assert post_one(small, "ok.png", png_declaring(1000, 1000)).status_code == 202


# --- truncated and corrupt files ----------------------------------------------------------

JPEG, PNG = encode("JPEG"), encode("PNG")
TIFF = encode("TIFF")

# Refused at the gateway from the structure alone, without decoding.
AT_THE_GATEWAY = {
    "half.jpg": (JPEG[: len(JPEG) // 2], "truncated JPEG file"),
    "no-eoi.jpg": (JPEG[:-2], "truncated JPEG file"),
    "bad-header.jpg": (garbled(JPEG, b"\xff\xc0", 2, b"\xff" * 12), "corrupt JPEG file"),
    "half.png": (PNG[: len(PNG) // 2], "corrupt PNG file"),
    "bad-crc.png": (garbled(PNG, b"IDAT", 20, b"\x00" * 16), "corrupt PNG file"),
    "half.tiff": (TIFF[: len(TIFF) // 2], "truncated TIFF file"),
    "bad-ifd.tiff": (TIFF[:4] + struct.pack("<I", 10**9) + TIFF[8:], "corrupt TIFF file"),
}

# Well formed on the outside; only decoding finds the damage, so the worker fails the job.
IN_THE_WORKER = {
    "bogus-huffman.jpg": garbled(JPEG, b"\xff\xc4", 5, b"\xff" * 16),
    "idat-not-zlib.png": replace_chunk(PNG, b"IDAT", bytes(400)),
    "raw-strip-says-jpeg.tiff": set_tiff_tag(TIFF, 259, 7),
}


@pytest.mark.parametrize("name", list(AT_THE_GATEWAY))
def test_a_damaged_file_is_422_at_the_gateway(
    client: TestClient, settings: Settings, name: str
) -> None:
    data, why = AT_THE_GATEWAY[name]
    response = post_one(client, name, data)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{name}: {why}")
    assert db_jobs(settings) == []


def test_damage_found_only_by_decoding_fails_the_job_not_the_worker(
    client: TestClient, settings: Settings, run_worker: Callable[..., Worker]
) -> None:
    files = [("good.png", PNG), *IN_THE_WORKER.items()]
    files += [(name, data) for name, (data, _) in AT_THE_GATEWAY.items()]
    response = post_batch(client, files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert {r["filename"] for r in body["rejected"]} == set(AT_THE_GATEWAY)
    assert all(r["status_code"] == 422 for r in body["rejected"])

    worker = run_worker()  # returns: the worker survived every file

    states = {j.filename: (j.state, j.error) for j in db_jobs(settings)}
    assert states.pop("good.png") == ("done", None)
    assert set(states) == set(IN_THE_WORKER)
    for name, (state, error) in states.items():
        assert state == "failed" and error and "could not be decoded" in error, (name, error)
    assert worker.jobs_done == 1
    batch = client.get(body["status_url"]).json()
    assert batch["state"] == "done_with_failures"
    assert batch["counts"]["failed"] == len(IN_THE_WORKER)


# --- size limits --------------------------------------------------------------------------


def test_a_request_over_the_body_limit_is_413_before_anything_is_kept(
    make_client: MakeClient, settings: Settings
) -> None:
    with make_client(max_request_bytes=64 * 1024) as small:
        big = encode("PNG", (160, 160))  # ~77 kB of noise
        response = post_batch(small, [("big.png", big)])
        assert response.status_code == 413, response.text
        assert "HEPATO_MAX_REQUEST_BYTES" in response.json()["detail"]
        assert response.headers["connection"] == "close"
        assert post_batch(small, [("small.png", PNG)]).status_code == 202
    assert [j.filename for j in db_jobs(settings)] == ["small.png"]


def test_a_file_over_the_file_limit_is_413_by_name(
    make_client: MakeClient, settings: Settings
) -> None:
    big = encode("PNG", (160, 160))
    with make_client(max_file_bytes=len(big) - 1) as small:
        response = post_one(small, "big.png", big)
        assert response.status_code == 413
        assert response.json()["detail"] == (
            f"big.png: file is larger than the limit of {len(big) - 1} bytes"
        )
        body = post_batch(small, [("big.png", big), ("small.png", PNG)]).json()
        assert [j["filename"] for j in body["jobs"]] == ["small.png"]
        assert [(r["filename"], r["status_code"]) for r in body["rejected"]] == [("big.png", 413)]
    assert [j.filename for j in db_jobs(settings)] == ["small.png"]


def test_too_many_files_is_413_and_keeps_nothing(
    make_client: MakeClient, settings: Settings
) -> None:
    with make_client(max_files_per_request=3) as small:
        response = post_batch(small, [(f"{i}.png", PNG) for i in range(4)])
        assert response.status_code == 413
        assert response.json()["detail"] == (
            "Too many files. Maximum number of files is 3. "
            "Send the rest in another request (HEPATO_MAX_FILES_PER_REQUEST)."
        )
        assert db_jobs(settings) == []
        assert post_batch(small, [(f"{i}.png", PNG) for i in range(3)]).status_code == 202


def test_a_flood_of_10000_fields_is_413_fast(client: TestClient, settings: Settings) -> None:
    fields = {f"field{i}": "x" for i in range(10_000)}
    started = time.perf_counter()
    response = client.post("/v1/batches", data=fields, files=[("files", ("a.png", PNG))])
    elapsed = time.perf_counter() - started
    assert response.status_code == 413
    assert response.json()["detail"] == "Too many fields. Maximum number of fields is 100."
    # Refused at the 101st field, not after parsing 10,000 (which takes tens of seconds):
    # a bound far from both, as this VM's speed varies 2x between sessions.
    assert elapsed < 3.0
    assert db_jobs(settings) == []


# A real server (uvicorn on a free port): TestClient reads a whole body before the app runs.

LIVE_LIMIT = 1 * MiB
PIECE = 64 * 1024
STREAMED = 1024 * MiB  # what the client would send if no one stopped it


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    app = create_app(settings.model_copy(update={"max_request_bytes": LIVE_LIMIT}))
    with serve(app) as url:
        yield url


class Body:
    """A multipart upload that streams STREAMED bytes of one file, counting what is taken."""

    def __init__(self) -> None:
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        yield (
            b'--b\r\nContent-Disposition: form-data; name="files"; filename="huge.png"\r\n'
            b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n"
        )
        piece = bytes(PIECE)
        while self.sent < STREAMED:
            self.sent += PIECE
            yield piece


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversized_stream_is_cut_off_early(
    live_url: str, settings: Settings, declared: bool
) -> None:
    body = Body()
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    if declared:
        headers["Content-Length"] = str(STREAMED + 200)
    with httpx.Client(timeout=30) as http:
        response = http.post(f"{live_url}/v1/batches", content=iter(body), headers=headers)
    assert response.status_code == 413, response.text
    assert "HEPATO_MAX_REQUEST_BYTES" in response.json()["detail"]
    # What the server took before answering, plus what the sockets buffered in between.
    assert body.sent < 32 * MiB, f"the client sent {body.sent / MiB:.0f} MiB"
    assert db_jobs(settings) == []
