"""Bad input at the gateway, on the real services: disguised files, decompression bombs,
truncated and corrupt images, oversized requests, hostile filenames and metadata."""

from __future__ import annotations

import io
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from hepato.common.images import display_name
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.gateway.app import create_app
from hepato.worker.runner import Worker
from tests.conftest import SAMPLES
from tests.e2e import conftest as e2e
from tests.e2e.test_pipeline import db_jobs
from tests.security.files import (
    MiB,
    bmp_declaring,
    bucket_keys,
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

# The end-to-end fixtures (real services, clean Postgres and Redis per test).
base_settings = e2e.base_settings
settings = e2e.settings
client = e2e.client
models = e2e.models
run_worker = e2e.run_worker

# A bomb must be refused in well under a second, and with well under this much memory.
FAST_S = 0.5
SMALL_BYTES = 50 * MiB
KEY = re.compile(r"uploads/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpeg|tiff|bmp|webp)")

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
    assert elapsed < 1.0
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


# --- filenames are display text only --------------------------------------------------

HOSTILE_NAMES = [
    "../x.png",
    "../../../../etc/cron.d/evil.png",
    "/etc/passwd",
    "C:\\Windows\\System32\\x.png",
    "a.png/../../b.png",
    "nul\x00byte.png",
    "\x1b[31mterminal.png",
    "\u202egnp.exe",  # right-to-left override: displays as "exe.png"
    "\U0001f9ea\U0001f52c.png",
    "n" * 300 + ".png",
]


def raw_multipart(field: str, files: list[tuple[str, bytes]]) -> bytes:
    """Multipart with the names as raw UTF-8 (httpx would percent-escape NUL and CR)."""
    parts = [
        b'--b\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
        b"Content-Type: image/png\r\n\r\n%s\r\n" % (field.encode(), name.encode(), data)
        for name, data in files
    ]
    return b"".join(parts) + b"--b--\r\n"


def test_hostile_filenames_never_become_object_keys(client: TestClient, settings: Settings) -> None:
    store = ObjectStore(settings)
    buckets = {b.name for b in store.client.list_buckets()}
    before = bucket_keys(store)
    response = client.post(
        "/v1/batches",
        content=raw_multipart("files", [(name, PNG) for name in HOSTILE_NAMES]),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 202, response.text
    # python-multipart keeps what follows a backslash (old browsers sent full Windows paths).
    shown = [display_name(name.rsplit("\\", 1)[-1]) for name in HOSTILE_NAMES]
    assert [j["filename"] for j in response.json()["jobs"]] == shown
    assert shown[5] == "nul\ufffdbyte.png" and shown[-1] == HOSTILE_NAMES[-1]

    jobs = db_jobs(settings)
    assert sorted(j.filename for j in jobs) == sorted(shown)
    keys = {j.object_key for j in jobs}
    assert len(keys) == len(HOSTILE_NAMES) and all(KEY.fullmatch(k) for k in keys), keys
    assert bucket_keys(store) - before == keys  # nothing else was written
    assert {b.name for b in store.client.list_buckets()} == buckets
    for job in jobs:
        shown_job = client.get(f"/v1/jobs/{job.id}").json()
        assert shown_job["filename"] == job.filename
        assert client.get(shown_job["image_url"]).content == PNG


def test_a_name_longer_than_a_multipart_header_allows_is_400(
    client: TestClient, settings: Settings
) -> None:
    """python-multipart caps a part's header at 4 kB, so a name cannot grow without bound."""
    response = client.post(
        "/v1/batches",
        content=raw_multipart("files", [("n" * 10_000 + ".png", PNG)]),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "Invalid multipart data."
    assert db_jobs(settings) == []


# --- metadata is not echoed ---------------------------------------------------------------

MARKER = "SECRET-7f3a9c"


def jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = f"Make {MARKER}"
    exif[0x0110] = f"Model {MARKER}"
    exif[0x0131] = f"Software {MARKER}"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\x00\x00\x00" + MARKER.encode()  # UserComment
    buf = io.BytesIO()
    Image.open(io.BytesIO(JPEG)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def png_with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKER)
    info.add_text("Author", MARKER, zip=True)
    info.add_itxt("Description", MARKER)
    buf = io.BytesIO()
    Image.open(io.BytesIO(PNG)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_metadata_is_in_no_api_response(
    client: TestClient, settings: Settings, run_worker: Callable[..., object]
) -> None:
    jpeg, png = jpeg_with_exif(), png_with_text()
    exif = Image.open(io.BytesIO(jpeg)).getexif()
    assert exif[0x0110] == f"Model {MARKER}" and exif.get_ifd(0x8825)[1] == "N"
    assert Image.open(io.BytesIO(png)).info["Comment"] == MARKER
    assert (MARKER.encode() in jpeg) and (MARKER.encode() in png)

    answers = [post_one(client, "exif.jpg", jpeg), post_one(client, "text.png", png)]
    batch = post_batch(client, [("exif.jpg", jpeg), ("text.png", png)])
    answers.append(batch)
    run_worker()
    jobs = db_jobs(settings)
    answers += [client.get(f"/v1/jobs/{j.id}") for j in jobs]
    answers.append(client.get(batch.json()["status_url"]))
    assert {j.state for j in jobs} == {"done"}
    for answer in answers:
        assert answer.status_code in (200, 202) and MARKER not in answer.text, answer.text
    # By design the image endpoint returns the file exactly as uploaded, metadata included.
    image = client.get(f"/v1/jobs/{jobs[0].id}/image")
    assert MARKER.encode() in image.content


@pytest.mark.parametrize("deadline", ["1e300", "inf", "nan", "-1", "0"])
def test_an_absurd_deadline_is_a_422_not_a_crash(client: TestClient, deadline: str) -> None:
    # 1e300 s once overflowed the timestamp arithmetic into a 500 (found by the fuzzer).
    path = sorted(SAMPLES.glob("synthetic_*.png"))[0]
    response = client.post(
        "/v1/jobs", files={"file": (path.name, path.read_bytes())}, data={"deadline_s": deadline}
    )
    assert response.status_code == 422, response.text
