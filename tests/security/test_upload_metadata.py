"""What an upload carries besides its pixels, on the real services: hostile filenames are
display text only, metadata is echoed by no API response, absurd form fields are 422."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from hepato.common.images import display_name
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from tests.conftest import SAMPLES
from tests.e2e import conftest as e2e
from tests.e2e.test_pipeline import db_jobs
from tests.security.files import bucket_keys, encode, post_batch, post_one

pytestmark = pytest.mark.slow

# Fixtures are found by the module attributes that hold them (base_settings and settings
# come from conftest.py).
client = e2e.client
models = e2e.models
run_worker = e2e.run_worker

KEY = re.compile(r"uploads/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpeg|tiff|bmp|webp)")
JPEG, PNG = encode("JPEG"), encode("PNG")


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
