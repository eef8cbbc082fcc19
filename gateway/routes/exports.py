"""Detection exports of one job or a whole batch: ``GET .../export?format=``.

Exports are streamed: jobs are read from Postgres a page at a time (keyset pagination on
``(created_at, id)``, each page in a short session of its own, so no transaction stays open
while a slow client downloads) and written out as they are read (gateway.export_formats).
Only jobs that are ``done`` with a detect result contribute; the others of a batch are
left out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from sqlalchemy import ColumnElement, Select, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from hepato.common import audit, schemas
from hepato.common.audit import Action, Caller, ObjectType
from hepato.common.constants import JobState
from hepato.common.results import TASK_RESULT, DetectResult
from hepato.common.tables import Batch, Job
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import Resources, ResourcesDep, SessionDep
from hepato.gateway.export_formats import (
    MEDIA_TYPES,
    SUFFIXES,
    ExportFormat,
    Image,
    chunked,
    coco_pieces,
    csv_pieces,
    geojson_pieces,
)
from hepato.gateway.lookups import BatchDep, JobDep

router = APIRouter(prefix="/v1", tags=["exports"])


def batch_scope(batch: Batch) -> ColumnElement[bool]:
    return (Job.batch_id == batch.id) & (Job.tenant == batch.tenant)


def page_query(
    scope: ColumnElement[bool], after: tuple[datetime, uuid.UUID] | None, page_size: int
) -> Select[Any]:
    """One page of done jobs after the keyset ``after``. A batch's pages are read through
    ix_jobs_batch_state_created (batch_id, state, created_at, id): in order, no sort, and
    from the keyset on, however deep the page (tests/e2e/test_export_plan.py)."""
    query = (
        select(Job.created_at, Job.id, Job.filename, Job.width, Job.height, Job.result)
        .where(scope, Job.state == JobState.done)
        .order_by(Job.created_at, Job.id)
        .limit(page_size)
    )
    if after is not None:
        query = query.where(tuple_(Job.created_at, Job.id) > tuple_(*after))
    return query


def iter_images(
    sessions: sessionmaker[Session], scope: ColumnElement[bool], page_size: int
) -> Iterator[Image]:
    """The done jobs in ``scope`` with a detect result, in (created_at, id) order, read one
    page per query."""
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        query = page_query(scope, after, page_size)
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
    res: Resources,
    session: Session,
    caller: Caller,
    target: tuple[ObjectType, uuid.UUID],
    fmt: ExportFormat,
    scope: ColumnElement[bool],
    model: str,
    name: str,
) -> StreamingResponse:
    audit.commit(session, caller, Action.export, *target, format=fmt.value)
    # The request's session would otherwise hold its transaction open while the file streams.
    session.close()
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
    batch: BatchDep,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
    fmt: FormatQuery = ExportFormat.geojson,
) -> StreamingResponse:
    for task in session.scalars(select(Job.task).where(Job.batch_id == batch.id).distinct()):
        _require_detect(batch.model, task)
    scope = batch_scope(batch)
    target = (ObjectType.batch, batch.id)
    return _response(res, session, caller, target, fmt, scope, batch.model, f"batch-{batch.id}")


@router.get(
    "/jobs/{job_id}/export",
    response_class=StreamingResponse,
    responses=EXPORT_RESPONSES,
    summary="A job's detections as QuPath GeoJSON, COCO JSON or CSV",
)
def export_job(
    job: JobDep,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
    fmt: FormatQuery = ExportFormat.geojson,
) -> StreamingResponse:
    _require_detect(job.model, job.task)
    scope = (Job.id == job.id) & (Job.tenant == job.tenant)
    target = (ObjectType.job, job.id)
    return _response(res, session, caller, target, fmt, scope, job.model, f"job-{job.id}")
