"""Exports (QuPath GeoJSON, COCO, CSV) on real Postgres, Redis and S3: what the files
hold against what the API answers, that they load in the tools they are for, and that
a large export is read in pages and written in chunks."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from pycocotools.coco import COCO
from sqlalchemy import event, insert, text, update
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job
from hepato.gateway.export_formats import CLASS_COLORS, CSV_HEADER
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_pipeline import submit, upload

pytestmark = pytest.mark.slow

# The official GeoJSON FeatureCollection schema (https://geojson.org/schema/FeatureCollection.json,
# repository geojson/schema), vendored so the test needs no network.
SCHEMA = json.loads((Path(__file__).parent / "geojson-FeatureCollection.schema.json").read_text())
LABELS = ["fibrosis", "inflammation", "steatosis", "ballooning"]
# Jobs per export query in the scale test: 3 x 500 boxes per page of a 100,000-box batch.
PAGE = 3


def sample_paths() -> list[Path]:
    """Images of three sizes, so the boxes are in pixels of images that differ."""
    return [*images(SAMPLES, "synthetic_0*.png"), SAMPLES / "ihc_colon_tile_00.png"]


def run_batch(client: TestClient, run_worker: Any, paths: list[Path] | None = None) -> str:
    accepted = submit(client, paths or sample_paths())
    run_worker()
    return str(accepted["batch_id"])


def api_jobs(client: TestClient, batch_id: str) -> dict[str, dict[str, Any]]:
    batch = client.get(f"/v1/batches/{batch_id}", params={"page_size": 1000}).json()
    assert batch["state"] == "done", batch
    return {job["id"]: job for job in batch["jobs"]}


def ring(box: dict[str, float]) -> list[list[float]]:
    x1, y1, x2, y2 = box["x1"], box["y1"], box["x2"], box["y2"]
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]


def export(client: TestClient, path: str, fmt: str) -> Any:
    response = client.get(path, params={"format": fmt})
    assert response.status_code == 200, response.text
    return response


def test_geojson_is_a_valid_feature_collection_of_the_api_boxes(
    client: TestClient, run_worker: Any
) -> None:
    batch_id = run_batch(client, run_worker)
    jobs = api_jobs(client, batch_id)
    response = export(client, f"/v1/batches/{batch_id}/export", "geojson")
    assert response.headers["content-type"] == "application/geo+json"
    disposition = response.headers["content-disposition"]
    assert disposition == f'attachment; filename="hepato-batch-{batch_id}.geojson"'
    collection = response.json()
    jsonschema.Draft7Validator(SCHEMA).validate(collection)

    features = collection["features"]
    by_job: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in jobs}
    for feature in features:
        by_job[feature["properties"]["image"]["job_id"]].append(feature)
    assert sum(len(j["result"]["boxes"]) for j in jobs.values()) == len(features) > 0
    assert len({f["id"] for f in features}) == len(features)
    for job_id, job in jobs.items():
        boxes = job["result"]["boxes"]
        assert len(by_job[job_id]) == len(boxes)
        for feature, box in zip(by_job[job_id], boxes, strict=True):
            uuid.UUID(feature["id"])
            assert feature["geometry"] == {"type": "Polygon", "coordinates": [ring(box)]}
            assert 0 <= box["x1"] < box["x2"] <= job["width"]
            props = feature["properties"]
            assert props["objectType"] == "detection"
            assert props["classification"] == {
                "name": box["label"],
                "color": list(CLASS_COLORS[box["label"]]),
            }
            assert props["measurements"] == {"score": box["score"]}
            assert props["image"] == {"job_id": job_id, "filename": job["filename"]}

        # One image's own FeatureCollection: exactly its features, the same ids again.
        own = export(client, f"/v1/jobs/{job_id}/export", "geojson")
        assert own.headers["content-disposition"].endswith(f'hepato-job-{job_id}.geojson"')
        own_collection = own.json()
        jsonschema.Draft7Validator(SCHEMA).validate(own_collection)
        assert own_collection["features"] == by_job[job_id]


def test_coco_loads_in_pycocotools_with_boxes_as_xywh(
    client: TestClient, run_worker: Any, tmp_path: Path
) -> None:
    batch_id = run_batch(client, run_worker)
    jobs = api_jobs(client, batch_id)
    response = export(client, f"/v1/batches/{batch_id}/export", "coco")
    assert response.headers["content-type"] == "application/json"
    path = tmp_path / "detections.json"
    path.write_bytes(response.content)

    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == LABELS
    assert len(coco.getImgIds()) == len(jobs)
    assert len(coco.getAnnIds()) == sum(len(j["result"]["boxes"]) for j in jobs.values()) > 0
    for image in coco.loadImgs(coco.getImgIds()):
        job = jobs[image["job_id"]]
        assert (image["file_name"], image["width"], image["height"]) == (
            job["filename"],
            job["width"],
            job["height"],
        )
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])), key=lambda a: a["id"])
        assert len(anns) == len(job["result"]["boxes"])
        for ann, box in zip(anns, job["result"]["boxes"], strict=True):
            x, y, w, h = ann["bbox"]
            assert (x, y) == (box["x1"], box["y1"])
            assert (x + w, y + h) == (pytest.approx(box["x2"]), pytest.approx(box["y2"]))
            assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] == 0
            assert ann["score"] == box["score"]
            assert ann["category_id"] == box["class_id"] + 1
            assert coco.loadCats(ann["category_id"])[0]["name"] == box["label"]

    # The same for one job: its image and its boxes only.
    job_id, job = next((i, j) for i, j in jobs.items() if j["result"]["boxes"])
    one = export(client, f"/v1/jobs/{job_id}/export", "coco").json()
    assert [i["job_id"] for i in one["images"]] == [job_id]
    assert [a["bbox"][0] for a in one["annotations"]] == [b["x1"] for b in job["result"]["boxes"]]


def test_csv_has_one_row_per_box_of_done_jobs_only(
    client: TestClient, settings: Settings, run_worker: Any
) -> None:
    paths = sample_paths()
    files = upload(paths)
    # A filename a spreadsheet would run as a formula.
    files[0] = ("files", ("=HYPERLINK(1).png", files[0][1][1], "image/png"))
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    batch_id = response.json()["batch_id"]
    run_worker()
    jobs = api_jobs(client, batch_id)
    # A job that is not done contributes nothing, though its result row is still there.
    formula = next(j for j in jobs.values() if j["filename"].startswith("="))
    assert formula["result"]["boxes"], "the demo model finds boxes on synthetic_00.png"
    left_out = next(i for i, j in jobs.items() if j["result"]["boxes"] and j["id"] != formula["id"])
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(update(Job).where(Job.id == uuid.UUID(left_out)).values(state="processing"))

    response = export(client, f"/v1/batches/{batch_id}/export", "csv")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(response.text)))
    assert tuple(rows[0]) == CSV_HEADER
    expected = [
        [
            job_id,
            job["filename"] if not job["filename"].startswith("=") else "'" + job["filename"],
            str(job["width"]),
            str(job["height"]),
            box["label"],
            str(box["class_id"]),
            *(repr(box[k]) for k in ("score", "x1", "y1", "x2", "y2")),
        ]
        for job_id, job in jobs.items()
        if job_id != left_out
        for box in job["result"]["boxes"]
    ]
    assert len(rows) - 1 == len(expected) > 0
    assert sorted(rows[1:]) == sorted(expected)
    assert any(r[1] == "'=HYPERLINK(1).png" for r in rows[1:])


# --- scale: pages and chunks -------------------------------------------------------------


def insert_jobs(
    settings: Settings,
    n_jobs: int,
    result: dict[str, Any] | None,
    *,
    tenant: str = "public",
    task: str = "detect",
    model: str = "hepato-yolov8n",
) -> tuple[str, list[str]]:
    """A batch of done jobs written straight to Postgres (no model run): for exports
    larger, or of other tasks and tenants, than the samples give."""
    batch_id = uuid.uuid4()
    ids = [uuid.uuid4() for _ in range(n_jobs)]
    row = {
        "batch_id": batch_id,
        "tenant": tenant,
        "object_key": "uploads/none.png",
        "image_format": "png",
        "size_bytes": 1,
        "width": 4096,
        "height": 4096,
        "model": model,
        "task": task,
        "priority": "routine",
        "state": "done",
        "attempts": 1,
        "max_attempts": 3,
        "result": result,
    }
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(
            insert(Batch).values(
                id=batch_id, tenant=tenant, model=model, priority="routine", total=n_jobs
            )
        )
        conn.execute(
            insert(Job), [{**row, "id": i, "filename": f"slide_{n}.png"} for n, i in enumerate(ids)]
        )
    return str(batch_id), [str(i) for i in ids]


def many_boxes(n: int) -> dict[str, Any]:
    return {
        "task": "detect",
        "boxes": [
            {
                "label": LABELS[i % 4],
                "class_id": i % 4,
                "score": 0.5,
                "x1": float(i),
                "y1": 1.0,
                "x2": i + 10.5,
                "y2": 20.25,
            }
            for i in range(n)
        ],
    }


def idle_in_transaction(settings: Settings, since: datetime) -> int:
    """Connections left idle inside a transaction by the export's page query, begun after
    ``since``: this request's, not another test's or thread's in the same database."""
    with get_engine(settings.database_url).connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND xact_start >= :since AND query LIKE '%ORDER BY jobs.created_at,%jobs.id%'"
        )
        return int(conn.execute(text(query), {"since": since}).scalar_one())


class BodyMessages:
    """ASGI wrapper that counts the body messages (chunks) of each response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.chunks = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.chunks += 1
            await send(message)

        await self.app(scope, receive, counting)


@pytest.fixture
def paged(settings: Settings) -> Iterator[tuple[TestClient, BodyMessages, list[str]]]:
    """A gateway reading PAGE jobs per export query, its chunk counter, and the SQL of
    the jobs queries it runs."""
    from hepato.gateway.app import create_app

    app = BodyMessages(create_app(settings.model_copy(update={"export_page_size": PAGE})))
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "ORDER BY jobs.created_at, jobs.id" in statement:
            statements.append(statement)

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        with TestClient(app) as client:
            yield client, app, statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_100k_detections_are_read_in_pages_and_streamed_in_chunks(
    settings: Settings, paged: tuple[TestClient, BodyMessages, list[str]]
) -> None:
    client, counter, statements = paged
    n_jobs, per_job = 200, 500
    batch_id, _ = insert_jobs(settings, n_jobs, many_boxes(per_job))

    started = datetime.now(UTC)
    with client.stream("GET", f"/v1/batches/{batch_id}/export?format=csv") as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        first = next(chunks)
        # The first chunk leaves before the rest is read: at most the page being written
        # and the one after it (the send in flight) have been queried.
        assert len(statements) <= 2, f"{len(statements)} pages read before the first chunk"
        assert idle_in_transaction(settings, started) == 0, "a session held open while streaming"
        size, lines = len(first), first.count(b"\n")
        for chunk in chunks:
            size += len(chunk)
            lines += chunk.count(b"\n")
    assert lines == 1 + n_jobs * per_job
    assert len(statements) == math.ceil(n_jobs / PAGE), "one query per page"
    assert counter.chunks > 10, f"{size:,} bytes in {counter.chunks} chunks"

    statements.clear()
    counter.chunks = 0
    response = client.get(f"/v1/batches/{batch_id}/export?format=geojson")
    collection = response.json()
    assert len(collection["features"]) == n_jobs * per_job
    assert counter.chunks > 10 and len(statements) == math.ceil(n_jobs / PAGE)
    ids = [f["properties"]["image"]["job_id"] for f in collection["features"]]
    assert len(set(ids)) == n_jobs, "every job once, in one run of its features"
    assert sum(a != b for a, b in itertools.pairwise(ids)) == n_jobs - 1


# --- refusals ----------------------------------------------------------------------------


def test_another_tenants_or_unknown_ids_are_404(client: TestClient, settings: Settings) -> None:
    batch_id, job_ids = insert_jobs(settings, 2, many_boxes(3), tenant="other-lab")
    for path in (
        f"/v1/batches/{batch_id}/export",
        f"/v1/jobs/{job_ids[0]}/export",
        f"/v1/batches/{uuid.uuid4()}/export",
        f"/v1/jobs/{uuid.uuid4()}/export",
        "/v1/jobs/not-a-uuid/export",
    ):
        for fmt in ("geojson", "coco", "csv"):
            response = client.get(path, params={"format": fmt})
            assert response.status_code == 404, (path, fmt, response.text)
            assert "no " in response.json()["detail"]
    # The owner's own ids answer: the 404 above is the tenant's scope, nothing else.
    mine, _ = insert_jobs(settings, 2, many_boxes(3))
    assert client.get(f"/v1/batches/{mine}/export").status_code == 200


def test_non_detect_models_and_unknown_formats_are_422(
    client: TestClient, settings: Settings
) -> None:
    classify = {
        "task": "classify",
        "labels": [{"label": "fibrosis", "class_id": 0, "probability": 1.0}],
    }
    batch_id, job_ids = insert_jobs(
        settings, 2, classify, task="classify", model="hepato-resnet18-tiny"
    )
    for path in (f"/v1/batches/{batch_id}/export", f"/v1/jobs/{job_ids[0]}/export"):
        response = client.get(path, params={"format": "coco"})
        assert response.status_code == 422
        assert response.json()["detail"] == (
            "exports hold boxes; model 'hepato-resnet18-tiny' is a classify model"
        )
    detect_batch, _ = insert_jobs(settings, 1, many_boxes(1))
    response = client.get(f"/v1/batches/{detect_batch}/export", params={"format": "xml"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == [
        "query",
        "format",
    ]
