"""The whole-slide half of the Python client and of ``hepato submit | status | results``
against small stub apps served like the real gateway (uvicorn on a free port): a slide
streamed from disk with its form fields and one Idempotency-Key across retries, the
slide's event stream followed and resumed, polling where it is missing, the export
streamed (gzip-decoded) to a file, and the CLI sending slides and images each their way."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from typer.testing import CliRunner

from hepato.cli.main import app as cli_app
from hepato.client import HepatoAPIError, HepatoClient, SlideOut
from hepato.common.slide_schemas import RESEARCH_USE_ONLY
from tests.e2e.test_client_stubs import accepted_body, batch_out, sse
from tests.server import serve
from tests.slides.make import write_png, write_svs

pytestmark = pytest.mark.slow

MiB = 1 << 20


def accepted(slide_id: uuid.UUID, filename: str = "s.svs", size: int = 1) -> dict[str, Any]:
    url = f"http://x/v1/slides/{slide_id}"
    out = {"slide_id": str(slide_id), "status_url": url, "events_url": f"{url}/events"}
    return {**out, "filename": filename, "format": "aperio-svs", "size_bytes": size}


def slide_out(
    slide_id: uuid.UUID, state: str, done: int = 0, total: int = 0, **more: Any
) -> dict[str, Any]:
    tiles = {"total": total, "done": done, "pending": total - done}
    return {
        "id": str(slide_id),
        "state": state,
        "filename": "s.svs",
        "format": "aperio-svs",
        "size_bytes": 100,
        "model": "stub",
        "tiles": tiles,
        "created_at": datetime.now(UTC).isoformat(),
        **more,
    }


SUMMARY = {
    "tissue_area_mm2": 12.5,
    "tiles": {"total": 4, "done": 4},
    "classes": [
        {"label": "steatosis", "count": 40, "per_mm2": 3.2, "area_fraction": 0.12},
        {"label": "ballooning", "count": 5, "per_mm2": 0.4, "area_fraction": 0.01},
    ],
    "steatosis_band": "5-33%",
}


def finished(slide_id: uuid.UUID) -> dict[str, Any]:
    return slide_out(slide_id, "done", 4, 4, width=2048, height=1536, summary=SUMMARY)


async def read_upload(request: Request) -> tuple[dict[str, str], str, bytes]:
    """(form fields, the file's name, its bytes) of a slide's POST."""
    form = await request.form()
    upload = form["file"]
    assert isinstance(upload, UploadFile)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return fields, upload.filename or "", await upload.read()


def test_submit_slide_sends_the_file_and_its_fields(tmp_path: Path) -> None:
    svs = write_svs(tmp_path / "liver.svs")
    slide_id = uuid.uuid4()
    got: list[tuple[dict[str, str], str, bytes, str | None]] = []

    async def post(request: Request) -> Response:
        fields, name, body = await read_upload(request)
        if name.endswith(".png"):
            return JSONResponse({"detail": "a PNG image, not a whole-slide image"}, 415)
        got.append((fields, name, body, request.headers.get("idempotency-key")))
        return JSONResponse(accepted(slide_id, name, len(body)), 202)

    with (
        serve(Starlette(routes=[Route("/v1/slides", post, methods=["POST"])])) as url,
        HepatoClient(url, "k") as client,
    ):
        ref = client.submit_slide(
            svs,
            model="hepato-yolov8n",
            priority="urgent",
            deadline_s=3600,
            callback_url="https://lab.example/hook",
            deidentify=True,
            mpp=0.5,
        )
        with pytest.raises(ValueError, match="mpp"):
            client.submit_slide(svs, mpp=0)
        with pytest.raises(FileNotFoundError):
            client.submit_slide(tmp_path / "missing.svs")
        with pytest.raises(HepatoAPIError) as refused:
            client.submit_slide(write_png(tmp_path / "x.png"))
    assert refused.value.status_code == 415 and "PNG" in refused.value.detail
    assert ref.slide_id == slide_id and ref.filename == "liver.svs"
    [(fields, name, body, key)] = got
    assert body == svs.read_bytes() and name == "liver.svs" and key
    assert fields == {
        "model": "hepato-yolov8n",
        "priority": "urgent",
        "deadline_s": "3600",
        "callback_url": "https://lab.example/hook",
        "deidentify": "true",
        "mpp": "0.5",
    }


def test_submit_slide_retries_under_one_idempotency_key(tmp_path: Path) -> None:
    svs = write_svs(tmp_path / "liver.svs")
    seen: list[tuple[str | None, int]] = []
    answers = [(503, "0"), (429, "0"), (409, "0")]

    async def post(request: Request) -> Response:
        _, _, body = await read_upload(request)
        seen.append((request.headers.get("idempotency-key"), len(body)))
        if answers:
            code, after = answers.pop(0)
            return JSONResponse({"detail": "busy"}, code, headers={"Retry-After": after})
        return JSONResponse(accepted(uuid.uuid4(), size=len(body)), 202)

    with (
        serve(Starlette(routes=[Route("/v1/slides", post, methods=["POST"])])) as url,
        HepatoClient(url, "k", backoff_s=0.01) as client,
    ):
        client.submit_slide(svs)
    assert len(seen) == 4
    assert len({k for k, _ in seen}) == 1 and seen[0][0], "every retry carries the same key"
    assert {n for _, n in seen} == {svs.stat().st_size}, "each retry sends the whole file"


class Drain:
    """A slide endpoint that reads the body piece by piece and keeps none of it."""

    def __init__(self) -> None:
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            self.received += len(message.get("body", b""))
            more = message.get("more_body", False)
        await JSONResponse(accepted(uuid.uuid4(), size=self.received), 202)(scope, receive, send)


def test_a_slide_is_streamed_from_disk_never_read_whole(tmp_path: Path) -> None:
    size = 256 * MiB
    svs = write_svs(tmp_path / "big.svs")
    os.truncate(svs, size)  # a sparse tail: 256 MiB on the wire, little on disk
    drain = Drain()
    uploaded: list[Path] = []
    with serve(drain) as url, HepatoClient(url, "k") as client:
        tracemalloc.start()
        try:
            client.submit_slide(svs, on_uploaded=uploaded.append)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert drain.received > size
    assert uploaded == [svs]
    # 256 MiB went through this process (client and server): 64 KiB chunks at a time.
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB while uploading a 256 MiB slide"


def events_app(slide_id: uuid.UUID, asked: list[str | None]) -> Starlette:
    """A slide's event stream that drops after its second event; resumed, it sends the
    rest and ends at the slide's last state."""
    states = [
        slide_out(slide_id, "pending"),
        slide_out(slide_id, "processing", 0, 4),
        slide_out(slide_id, "processing", 2, 4),
        finished(slide_id),
    ]

    async def stream(request: Request) -> Response:
        last = request.headers.get("last-event-id")
        asked.append(last)
        start = 0 if last is None else int(last) + 1
        stop = 2 if last is None else len(states)

        async def body() -> Any:
            yield b": keep-alive\n\n"
            for n in range(start, stop):
                yield sse("slide", states[n], n)

        return StreamingResponse(body(), media_type="text/event-stream")

    async def get(request: Request) -> Response:
        return JSONResponse(finished(slide_id))

    return Starlette(
        routes=[Route("/v1/slides/{sid}/events", stream), Route("/v1/slides/{sid}", get)]
    )


def test_wait_slide_reports_progress_and_resumes_a_dropped_stream() -> None:
    slide_id = uuid.uuid4()
    asked: list[str | None] = []
    seen: list[SlideOut] = []
    with serve(events_app(slide_id, asked)) as url, HepatoClient(url, "k", backoff_s=0.01) as c:
        final = c.wait_slide(slide_id, on_progress=seen.append, timeout=30)
    assert asked == [None, "1"]
    assert [(s.state, s.tiles.done, s.tiles.total) for s in seen] == [
        ("pending", 0, 0),
        ("processing", 0, 4),
        ("processing", 2, 4),
        ("done", 4, 4),
    ]
    assert final.state == "done" and final.summary is not None
    assert final.summary.steatosis_band == "5-33%"


def test_wait_slide_polls_where_there_are_no_events() -> None:
    slide_id = uuid.uuid4()
    progress = [
        *[slide_out(slide_id, "pending")] * 3,
        slide_out(slide_id, "processing", 1, 4),
        finished(slide_id),
    ]

    async def get(request: Request) -> Response:
        return JSONResponse(progress.pop(0) if len(progress) > 1 else progress[0])

    seen: list[SlideOut] = []
    with (
        serve(Starlette(routes=[Route("/v1/slides/{sid}", get)])) as url,
        HepatoClient(url, "k") as client,
    ):
        final = client.wait_slide(slide_id, on_progress=seen.append, timeout=30)
    assert [s.state for s in seen] == ["pending", "processing", "done"]
    assert final.state == "done" and final.tiles.done == 4


FEATURES = [{"type": "Feature", "id": n} for n in range(9)]
GEOJSON = {"type": "FeatureCollection", "features": FEATURES}
GEO = "application/geo+json"


def slide_reads_app(slide_id: uuid.UUID, hits: list[str]) -> Starlette:
    """A gateway that has the slide and no batch of that id (batch routes: 404)."""

    async def export(request: Request) -> Response:
        data = json.dumps(GEOJSON).encode()
        if "gzip" in request.headers.get("accept-encoding", ""):
            hits.append(f"export {request.query_params['format']} gzip")
            packed = gzip.compress(data)
            chunks = [packed[i : i + 50] for i in range(0, len(packed), 50)]
            headers = {"Content-Encoding": "gzip"}
            return StreamingResponse(iter(chunks), media_type=GEO, headers=headers)
        hits.append(f"export {request.query_params['format']}")
        return Response(data, media_type=GEO)

    async def get(request: Request) -> Response:
        hits.append("slide")
        return JSONResponse(finished(slide_id))

    async def listing(request: Request) -> Response:
        return JSONResponse({"slides": [finished(slide_id)]})

    async def cancel(request: Request) -> Response:
        return JSONResponse({"slide_id": str(slide_id), "canceled": 3})

    async def batch(request: Request) -> Response:
        hits.append("batch")
        return JSONResponse({"detail": "no such batch"}, 404)

    return Starlette(
        routes=[
            Route("/v1/slides", listing),
            Route("/v1/slides/{sid}/export", export),
            Route("/v1/slides/{sid}", get),
            Route("/v1/slides/{sid}", cancel, methods=["DELETE"]),
            Route("/v1/batches/{bid}", batch),
            Route("/v1/batches/{bid}/export", batch),
        ]
    )


def test_slide_reads_cancel_and_an_export_written_decoded(tmp_path: Path) -> None:
    slide_id = uuid.uuid4()
    hits: list[str] = []
    with serve(slide_reads_app(slide_id, hits)) as url, HepatoClient(url, "k") as client:
        assert [s.id for s in client.slides()] == [slide_id]
        assert client.cancel_slide(slide_id) == 3
        out = client.download_slide_export(slide_id, tmp_path / "s.geojson")
        with pytest.raises(ValueError, match="geojson or csv"):
            client.download_slide_export(slide_id, tmp_path / "s.json", "coco")  # type: ignore[arg-type]
    assert json.loads(out.read_text()) == GEOJSON and hits == ["export geojson gzip"]
    assert not (tmp_path / "s.geojson.part").exists()


def test_cli_sends_a_slide_to_slides_and_an_image_to_batches(tmp_path: Path) -> None:
    svs = write_svs(tmp_path / "liver.svs")
    png = write_png(tmp_path / "tile.png")
    slide_id = uuid.uuid4()
    posted: dict[str, Any] = {}
    asked: list[str | None] = []

    async def post_slide(request: Request) -> Response:
        fields, name, body = await read_upload(request)
        posted["slide"] = (name, fields)
        return JSONResponse(accepted(slide_id, name, len(body)), 202)

    async def post_batch(request: Request) -> Response:
        form = await request.form()
        posted["batch"] = [f.filename for f in form.getlist("files") if isinstance(f, UploadFile)]
        return JSONResponse(accepted_body(1), 202)

    async def get_batch(request: Request) -> Response:
        return JSONResponse(batch_out(uuid.UUID(request.path_params["bid"]), {"done": 1}))

    app = events_app(slide_id, asked)
    app.router.routes += [
        Route("/v1/slides", post_slide, methods=["POST"]),
        Route("/v1/batches", post_batch, methods=["POST"]),
        Route("/v1/batches/{bid}", get_batch),  # no batch events route: the wait polls
    ]
    with serve(app) as url:
        result = CliRunner().invoke(
            cli_app,
            [
                *["submit", str(svs), str(png), "--wait", "--deidentify", "--mpp", "0.25"],
                *["--url", url, "--api-key", "k"],
            ],
        )
    assert result.exit_code == 0, result.output
    assert posted["batch"] == ["tile.png"]
    name, fields = posted["slide"]
    assert name == "liver.svs" and fields["deidentify"] == "true" and fields["mpp"] == "0.25"
    assert f"{slide_id}\tslide liver.svs\taperio-svs" in result.stdout
    assert "1 jobs: 1 done" in result.stdout
    assert "tiles" in result.stderr  # the slide's progress bar
    for text in ("steatosis", "ballooning", "3.20", "12.00%", "12.50 mm²", "5-33%"):
        assert text in result.stdout, text
    assert RESEARCH_USE_ONLY in result.stdout


def test_cli_status_and_results_find_a_slide_by_its_id(tmp_path: Path) -> None:
    slide_id = uuid.uuid4()
    hits: list[str] = []
    runner = CliRunner()
    out = tmp_path / "cells.geojson"
    with serve(slide_reads_app(slide_id, hits)) as url:
        auth = ["--url", url, "--api-key", "k"]
        status = runner.invoke(cli_app, ["status", str(slide_id), *auth])
        results = runner.invoke(
            cli_app, ["results", str(slide_id), "--format", "geojson", "-o", str(out), *auth]
        )
        coco = runner.invoke(cli_app, ["results", str(slide_id), "-f", "coco", *auth])
    assert status.exit_code == 0, status.output
    assert f"slide {slide_id}: done" in status.stdout and "steatosis" in status.stdout
    assert results.exit_code == 0, results.output
    assert json.loads(results.stdout)["slide_id"] == str(slide_id)
    assert json.loads(out.read_text()) == GEOJSON
    assert coco.exit_code == 2 and "not coco" in coco.stderr
    # A slide's tile jobs form a batch of its id: a slide is never looked up as one.
    assert hits == ["slide", "slide", "export geojson gzip", "slide"]


def test_cli_an_id_that_is_neither_batch_nor_slide_is_404(tmp_path: Path) -> None:
    with serve(Starlette(routes=[])) as url:
        unknown = CliRunner().invoke(cli_app, ["status", str(uuid.uuid4()), "--url", url])
    assert unknown.exit_code == 2 and "404" in unknown.stderr and "slide" in unknown.stderr
