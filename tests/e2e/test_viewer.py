"""The web viewer in a real browser (Debian's Chromium driven by Playwright) against a
real gateway served by uvicorn and a worker thread, on the real local stack."""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tenants import create_key
from hepato.worker.backends.base import Model
from tests.conftest import REPO, SAMPLES
from tests.server import serve as serve_app

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "viewer.png"
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 60_000


def sample_images() -> list[Path]:
    found = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg"})
    assert len(found) >= 8, f"sample images missing in {SAMPLES}"
    return found


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The gateway on a free loopback port, in a thread; yields its base URL."""
    from hepato.gateway.app import create_app

    with serve_app(create_app(settings)) as url:
        yield url


@pytest.fixture
def worker(settings: Settings, models: dict[str, Model]) -> Iterator[Callable[[], None]]:
    """Starts a long-running worker (not burst) when called, so a test can hold the jobs
    pending until the page watches them."""
    from hepato.worker.runner import Worker

    w = Worker(settings, models)
    thread = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)

    def start() -> None:
        if not thread.is_alive():
            thread.start()

    yield start
    w.stopping.set()
    if thread.is_alive():
        thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the viewer test drives Debian's Chromium "
            "(apt-get install chromium); Playwright is never allowed to download a browser"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def batch_jobs(base: str, batch_id: str, key: str | None = None) -> list[dict[str, Any]]:
    headers = {"X-API-Key": key} if key else {}
    body = httpx.get(
        f"{base}/v1/batches/{batch_id}", params={"page_size": 1000}, headers=headers
    ).json()
    return body["jobs"]  # type: ignore[no-any-return]


def box_count(page: Any) -> int:
    return page.locator("#grid svg .box").count()  # type: ignore[no-any-return]


def upload_and_wait(page: Any, paths: list[Path]) -> str:
    from playwright.sync_api import expect

    page.set_input_files("#files", [str(p) for p in paths])
    expect(page.locator("#picked")).to_contain_text(f"{len(paths)} images chosen")
    page.get_by_role("button", name="Upload").click()
    return wait_complete(page, len(paths))


def wait_complete(page: Any, n: int) -> str:
    from playwright.sync_api import expect

    status = page.locator("#progress-text")
    expect(status).to_have_text(
        re.compile(rf"^Complete: {n} of {n} finished · {n} done · 0 failed"), timeout=TIMEOUT_MS
    )
    assert status.get_attribute("aria-live") == "polite"
    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [n, n]
    batch_id = re.search(r"[?&]batch=([0-9a-f-]{36})", page.url)
    assert batch_id, f"the page's address names no batch: {page.url}"
    return batch_id.group(1)


def test_viewer_uploads_watches_and_draws_boxes(
    settings: Settings, worker: Callable[[], None], page: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    paths = sample_images()
    with serve(settings) as base:
        page.goto(f"{base}/")
        assert page.url == f"{base}/viewer/"
        expect(page.locator("#model")).to_have_value(settings.default_model)
        expect(page.locator("#key-section")).to_be_hidden()  # open mode: no key asked

        # The jobs stay pending until the page asks for the batch's event stream.
        streams: list[str] = []

        def stream_opened(route: Any) -> None:
            streams.append(route.request.url)
            worker()
            route.continue_()

        page.route("**/v1/batches/*/events", stream_opened)
        batch_id = upload_and_wait(page, paths)
        assert streams == [f"{base}/v1/batches/{batch_id}/events"]
        expect(page.locator("#live-mode")).to_have_text("Followed live by server-sent events.")
        jobs = batch_jobs(base, batch_id)
        assert len(jobs) == len(paths) and all(j["state"] == "done" for j in jobs)
        boxes = [b for j in jobs for b in j["result"]["boxes"]]
        per_class = Counter(b["label"] for b in boxes)
        by_file = {j["filename"]: j["result"]["boxes"] for j in jobs}
        assert by_file["synthetic_00.png"], "the demo model finds boxes on synthetic_00.png"

        # Every box of the batch is drawn, labelled, on the card of its own image.
        card = page.locator('li.card[data-filename="synthetic_00.png"]')
        expect(card.locator("svg .box")).to_have_count(len(by_file["synthetic_00.png"]))
        first = by_file["synthetic_00.png"][0]
        expect(card.locator("svg text.label").first).to_have_text(
            f"{first['label']} {first['score']:.2f}"
        )
        assert box_count(page) == len(boxes)
        expect(page.locator("#boxes-shown")).to_have_text(str(len(boxes)))
        for label, n in per_class.items():
            expect(page.locator(f'#batch-counts tr[data-label="{label}"] td').first).to_have_text(
                str(n)
            )
        # The image itself arrived (fetched as a blob) and says what it is.
        card.scroll_into_view_if_needed()
        page.wait_for_function(
            """() => { const img = document.querySelector(
                 'li.card[data-filename="synthetic_00.png"] img');
               return img && img.complete && img.naturalWidth > 0; }"""
        )
        assert "synthetic_00.png" in (card.locator("img").get_attribute("alt") or "")

        # Hiding a class removes its boxes and lowers the counts; showing it restores them.
        label, n = per_class.most_common(1)[0]
        toggle = page.get_by_role("checkbox", name=label, exact=True)
        toggle.uncheck()
        expect(page.locator("#boxes-shown")).to_have_text(str(len(boxes) - n))
        assert box_count(page) == len(boxes) - n
        assert page.locator(f'#grid svg .box[data-label="{label}"]').count() == 0
        toggle.check()
        expect(page.locator("#boxes-shown")).to_have_text(str(len(boxes)))

        # The score slider by keyboard: End is its maximum, Home its minimum.
        slider = page.get_by_label("Minimum score")
        slider.focus()
        slider.press("End")
        at_max = sum(b["score"] >= 1.0 for b in boxes)
        expect(page.locator("#boxes-shown")).to_have_text(str(at_max))
        assert box_count(page) == at_max
        slider.press("Home")
        expect(page.locator("#boxes-shown")).to_have_text(str(len(boxes)))

        page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
        shot = page.screenshot(path=str(tmp_path / "viewer.png"))
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        # The committed picture is written when missing or asked for, so that a test run
        # does not leave a changed file behind each time.
        if not SCREENSHOT.exists() or os.environ.get("HEPATO_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            # 256 colours: the same picture at a third of the bytes in the repository.
            with Image.open(tmp_path / "viewer.png") as shot_image:
                shot_image.convert("RGB").quantize(
                    256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
                ).save(SCREENSHOT, optimize=True)

        # An existing batch opens from its address, already complete.
        again = page.context.new_page()
        again.goto(f"{base}/viewer/?batch={batch_id}")
        wait_complete(again, len(paths))
        expect(again.locator("#grid svg .box")).to_have_count(len(boxes))
        expect(again.locator("#batch-id")).to_have_value(batch_id)


def test_viewer_asks_for_a_key_when_one_is_required(
    settings: Settings, worker: Callable[[], None], page: Any
) -> None:
    from playwright.sync_api import expect

    required = settings.model_copy(update={"auth": "required"})
    key = create_key(get_engine(settings.database_url), "lab-a").key
    paths = [SAMPLES / "synthetic_00.png", SAMPLES / "synthetic_01.png"]
    worker()
    with serve(required) as base:
        # A gateway without the event stream: the page polls instead.
        page.route("**/v1/batches/*/events", lambda route: route.fulfill(status=404))
        page.goto(f"{base}/viewer/")
        expect(page.locator("#model")).to_have_value(settings.default_model)  # models: open
        page.set_input_files("#files", [str(p) for p in paths])
        page.get_by_role("button", name="Upload").click()
        # The upload was refused with 401: the page asks, then retries with the key.
        key_input = page.get_by_role("textbox", name="API key")
        expect(key_input).to_be_focused()
        key_input.fill(key)
        page.get_by_role("button", name="Use key").click()
        batch_id = wait_complete(page, len(paths))
        expect(page.locator("#live-mode")).to_have_text("Followed live by polling every second.")
        assert all(j["state"] == "done" for j in batch_jobs(base, batch_id, key))
        assert page.evaluate("sessionStorage.getItem('hepato.apiKey')") == key
        # Images need the key too: they come through fetch as blobs.
        page.wait_for_function(
            "() => [...document.querySelectorAll('#grid img')]"
            ".every(i => i.src.startsWith('blob:') && i.naturalWidth > 0)"
        )
        # Another tenant's batch is the same 404 as an unknown one, shown as an error.
        other = httpx.post(
            f"{base}/v1/batches",
            files=[("files", (p.name, p.read_bytes())) for p in paths],
            headers={"X-API-Key": create_key(get_engine(settings.database_url), "lab-b").key},
        ).json()["batch_id"]
        page.get_by_label("Batch id").fill(other)
        page.get_by_role("button", name="Open", exact=True).click()
        expect(page.get_by_role("alert")).to_contain_text("404")


def test_viewer_files_are_served_open_and_only_those(settings: Settings) -> None:
    from hepato.gateway.app import create_app

    required = settings.model_copy(update={"auth": "required"})
    with TestClient(create_app(required)) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "viewer/"
        shared = client.get("/viewer?batch=abc", follow_redirects=False)
        assert shared.headers["location"] == "viewer/?batch=abc"
        page = client.get("/viewer/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/viewer/viewer.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/viewer/viewer.css").headers["content-type"].startswith("text/css")
        for bad in ("../app.py", "..%2Fapp.py", "missing.js", "%2E%2E/viewer.py"):
            assert client.get(f"/viewer/{bad}").status_code == 404, bad
        # Nothing on the page reaches for another origin.
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
        # The API behind it still wants a key.
        assert client.get("/v1/batches/x").status_code == 401
