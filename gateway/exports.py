"""Detection results as files pathologists open: QuPath GeoJSON, COCO detection JSON and
CSV, for one job or a whole batch.

Exports are streamed: jobs are read from Postgres a page at a time (keyset pagination on
``(created_at, id)``, each page in a short session of its own, so no transaction stays open
while a slow client downloads) and written out as they are read, so a batch with 100,000
detections never sits in memory. Only jobs that are ``done`` with a detect result
contribute; the others of a batch are left out."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from sqlalchemy import ColumnElement, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from hepato.common import schemas
from hepato.common.constants import JobState
from hepato.common.results import TASK_RESULT, Box, DetectResult
from hepato.common.tables import Job
from hepato.gateway.auth import TenantDep
from hepato.gateway.deps import Resources, ResourcesDep, SessionDep
from hepato.gateway.lookups import batch_or_404, job_or_404

router = APIRouter(prefix="/v1", tags=["exports"])


class ExportFormat(StrEnum):
    geojson = "geojson"
    coco = "coco"
    csv = "csv"


MEDIA_TYPES = {
    ExportFormat.geojson: "application/geo+json",
    ExportFormat.coco: "application/json",
    ExportFormat.csv: "text/csv; charset=utf-8",
}
SUFFIXES = {
    ExportFormat.geojson: ".geojson",
    ExportFormat.coco: ".coco.json",
    ExportFormat.csv: ".csv",
}
# Okabe-Ito colours: told apart under the common colour-vision deficiencies.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "fibrosis": (0, 114, 178),
    "inflammation": (213, 94, 0),
    "steatosis": (240, 228, 66),
    "ballooning": (204, 121, 167),
}
CSV_HEADER = (
    "job_id",
    "filename",
    "width",
    "height",
    "label",
    "class_id",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
)
# Spreadsheets run a cell starting with one of these as a formula; filenames are client text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CHUNK_CHARS = 64 * 1024


@dataclass(frozen=True)
class Image:
    """One done detect job: an image and its boxes."""

    job_id: uuid.UUID
    filename: str
    width: int
    height: int
    boxes: list[Box]


def class_color(label: str) -> tuple[int, int, int]:
    """The class's fixed colour; any other label gets one derived from its name, so it
    is the same in every export."""
    if label in CLASS_COLORS:
        return CLASS_COLORS[label]
    r, g, b = hashlib.sha256(label.encode()).digest()[:3]
    return r, g, b


def iter_images(
    sessions: sessionmaker[Session], scope: ColumnElement[bool], page_size: int
) -> Iterator[Image]:
    """The done jobs in ``scope`` with a detect result, in (created_at, id) order, read one
    page per query."""
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        query = (
            select(Job.created_at, Job.id, Job.filename, Job.width, Job.height, Job.result)
            .where(scope, Job.state == JobState.done)
            .order_by(Job.created_at, Job.id)
            .limit(page_size)
        )
        if after is not None:
            query = query.where(tuple_(Job.created_at, Job.id) > tuple_(*after))
        with sessions() as session:
            # Autocommit: a read-only page needs no transaction, and none is left open
            # between the query and the session's close while the file streams.
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            rows = session.execute(query).all()
        for row in rows:
            result = TASK_RESULT.validate_python(row.result) if row.result is not None else None
            if isinstance(result, DetectResult):
                yield Image(row.id, row.filename, row.width, row.height, result.boxes)
        if len(rows) < page_size:
            return
        after = (rows[-1].created_at, rows[-1].id)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def qupath_feature(image: Image, index: int, box: Box) -> dict[str, Any]:
    """One box as QuPath (0.4+) writes a detection: a closed rectangle in pixels of the
    original image (origin top left), its class with a colour, measurements as a map."""
    ring = [[box.x1, box.y1], [box.x2, box.y1], [box.x2, box.y2], [box.x1, box.y2]]
    return {
        "type": "Feature",
        # Derived, not random: exporting twice gives the same ids, so re-imports match.
        "id": str(uuid.uuid5(image.job_id, str(index))),
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": box.label, "color": list(class_color(box.label))},
            "measurements": {"score": box.score},
            "image": {"job_id": str(image.job_id), "filename": image.filename},
        },
    }


def geojson_pieces(images: Iterable[Image]) -> Iterator[str]:
    yield '{"type":"FeatureCollection","features":['
    sep = ""
    for image in images:
        for index, box in enumerate(image.boxes):
            yield sep + _dumps(qupath_feature(image, index, box))
            sep = ","
    yield "]}"


def coco_pieces(
    images: Iterable[Image], labels: Sequence[str], info: dict[str, Any]
) -> Iterator[str]:
    """COCO detection JSON. Annotations stream as they are read; the images (one short
    entry per image, not per box) and the categories follow them, so one pass over the
    jobs gives ids that agree even while the batch is still finishing."""
    yield '{"info":' + _dumps(info) + ',"annotations":['
    image_entries: list[str] = []
    names = dict(enumerate(labels))
    ann_id = 0
    for image_id, image in enumerate(images, start=1):
        image_entries.append(
            _dumps(
                {
                    "id": image_id,
                    "file_name": image.filename,
                    "width": image.width,
                    "height": image.height,
                    "job_id": str(image.job_id),
                }
            )
        )
        for box in image.boxes:
            ann_id += 1
            names.setdefault(box.class_id, box.label)
            w, h = box.x2 - box.x1, box.y2 - box.y1
            annotation = {
                "id": ann_id,
                "image_id": image_id,
                # 0 is "background" to many COCO tools: category ids are class ids + 1.
                "category_id": box.class_id + 1,
                "bbox": [box.x1, box.y1, w, h],
                "area": w * h,
                "iscrowd": 0,
                "score": box.score,
            }
            yield ("," if ann_id > 1 else "") + _dumps(annotation)
    yield '],"images":['
    for i, entry in enumerate(image_entries):
        yield ("," if i else "") + entry
    categories = [{"id": cid + 1, "name": name} for cid, name in sorted(names.items())]
    yield '],"categories":' + _dumps(categories) + "}"


def _cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_pieces(images: Iterable[Image]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for image in images:
        name = _cell(image.filename)
        for b in image.boxes:
            row = (b.label, b.class_id, b.score, b.x1, b.y1, b.x2, b.y2)
            writer.writerow((image.job_id, name, image.width, image.height, *row))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def chunked(pieces: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[bytes]:
    """Join small pieces into chunks of about ``size`` characters: one network write per
    chunk rather than per box."""
    parts: list[str] = []
    held = 0
    for piece in pieces:
        parts.append(piece)
        held += len(piece)
        if held >= size:
            yield "".join(parts).encode()
            parts, held = [], 0
    if parts:
        yield "".join(parts).encode()


def export_chunks(
    res: Resources, fmt: ExportFormat, scope: ColumnElement[bool], model: str, source: str
) -> Iterator[bytes]:
    images = iter_images(res.sessions, scope, res.settings.export_page_size)
    if fmt is ExportFormat.geojson:
        pieces = geojson_pieces(images)
    elif fmt is ExportFormat.coco:
        manifest = res.models.get(model)
        info = {
            "description": f"HepatoAI detections of {source}",
            "model": model,
            "date_created": datetime.now(UTC).isoformat(),
        }
        pieces = coco_pieces(images, manifest.labels if manifest else [], info)
    else:
        pieces = csv_pieces(images)
    return chunked(pieces)


def _require_detect(model: str, task: str) -> None:
    if task != "detect":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"exports hold boxes; model {model!r} is a {task} model",
        )


def _response(
    res: Resources, fmt: ExportFormat, scope: ColumnElement[bool], model: str, name: str
) -> StreamingResponse:
    return StreamingResponse(
        export_chunks(res, fmt, scope, model, name),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="hepato-{name}{SUFFIXES[fmt]}"'},
    )


FormatQuery = Annotated[ExportFormat, Query(alias="format", description="File format")]
EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The detections as a file (streamed)",
        "content": {"application/geo+json": {}, "application/json": {}, "text/csv": {}},
    },
    404: {"model": schemas.ErrorOut, "description": "No such id for this tenant"},
    422: {"model": schemas.Unprocessable, "description": "Not a detect model, or a bad format"},
    503: {"model": schemas.ErrorOut, "description": "Postgres is down; retry after Retry-After"},
}


@router.get(
    "/batches/{batch_id}/export",
    response_class=StreamingResponse,
    responses=EXPORT_RESPONSES,
    summary="A batch's detections as QuPath GeoJSON, COCO JSON or CSV (done jobs only)",
)
def export_batch(
    batch_id: str,
    res: ResourcesDep,
    session: SessionDep,
    tenant: TenantDep,
    fmt: FormatQuery = ExportFormat.geojson,
) -> StreamingResponse:
    batch = batch_or_404(session, batch_id, tenant)
    for task in session.scalars(select(Job.task).where(Job.batch_id == batch.id).distinct()):
        _require_detect(batch.model, task)
    scope = (Job.batch_id == batch.id) & (Job.tenant == tenant)
    model, name = batch.model, f"batch-{batch.id}"
    # The request's session would otherwise hold its transaction open while the file streams.
    session.close()
    return _response(res, fmt, scope, model, name)


@router.get(
    "/jobs/{job_id}/export",
    response_class=StreamingResponse,
    responses=EXPORT_RESPONSES,
    summary="A job's detections as QuPath GeoJSON, COCO JSON or CSV",
)
def export_job(
    job_id: str,
    res: ResourcesDep,
    session: SessionDep,
    tenant: TenantDep,
    fmt: FormatQuery = ExportFormat.geojson,
) -> StreamingResponse:
    job = job_or_404(session, job_id, tenant)
    _require_detect(job.model, job.task)
    scope = (Job.id == job.id) & (Job.tenant == tenant)
    model, name = job.model, f"job-{job.id}"
    session.close()
    return _response(res, fmt, scope, model, name)
