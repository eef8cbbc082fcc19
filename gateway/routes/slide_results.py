"""A slide's results as files: every detection in level-0 pixels as QuPath GeoJSON or
CSV (streamed, gzip when the client accepts it), and its thumbnail and tissue mask.

The export reads the slide's done tiles a page at a time (keyset on the job id), each page
in a short session of its own, as the image exports do. A feature's id is derived from
its tile and its place in the tile's result, so every export of a slide names each
detection the same. The thumbnail is rendered from the pyramid by the planning worker:
never from the label or macro photographs."""

from __future__ import annotations

import csv
import io
import json
import uuid
import zlib
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, status
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hepato.common import audit
from hepato.common.audit import Action, Caller, ObjectType
from hepato.common.constants import JobState
from hepato.common.exceptions import ObjectFetchError, ObjectMissing
from hepato.common.results import TASK_RESULT, Box, DetectResult
from hepato.common.tables import Job
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import ResourcesDep, SessionDep
from hepato.gateway.export_formats import chunked, class_color
from hepato.gateway.lookups import NOT_FOUND
from hepato.gateway.routes.slides import slide_or_404

router = APIRouter(prefix="/v1", tags=["slides"])

CSV_HEADER = ("feature_id", "label", "class_id", "score", "x1", "y1", "x2", "y2")


class SlideExportFormat(StrEnum):
    geojson = "geojson"
    csv = "csv"


_MEDIA = {SlideExportFormat.geojson: "application/geo+json", SlideExportFormat.csv: "text/csv"}


def iter_detections(
    sessions: sessionmaker[Session], slide_id: uuid.UUID, page_size: int
) -> Iterator[tuple[str, Box]]:
    """(feature id, box) of every detection of the slide's done tiles, in tile id order."""
    after: uuid.UUID | None = None
    while True:
        query = (
            select(Job.id, Job.result)
            .where(Job.batch_id == slide_id, Job.kind == "tile", Job.state == JobState.done)
            .order_by(Job.id)
            .limit(page_size)
        )
        if after is not None:
            query = query.where(Job.id > after)
        with sessions() as session:
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            rows = session.execute(query).all()
        for job_id, raw in rows:
            result = TASK_RESULT.validate_python(raw) if raw is not None else None
            if isinstance(result, DetectResult):
                for index, box in enumerate(result.boxes):
                    yield str(uuid.uuid5(job_id, str(index))), box
        if len(rows) < page_size:
            return
        after = rows[-1].id


def feature(feature_id: str, box: Box) -> dict[str, Any]:
    """A detection as QuPath (0.4+) reads one onto the open slide: a closed rectangle in
    level-0 pixels, its class with a colour, the score among its measurements."""
    ring = [[box.x1, box.y1], [box.x2, box.y1], [box.x2, box.y2], [box.x1, box.y2]]
    return {
        "type": "Feature",
        "id": feature_id,
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": box.label, "color": list(class_color(box.label))},
            "measurements": {"score": box.score},
        },
    }


def geojson_pieces(found: Iterable[tuple[str, Box]]) -> Iterator[str]:
    yield '{"type":"FeatureCollection","features":['
    sep = ""
    for feature_id, box in found:
        yield sep + json.dumps(feature(feature_id, box), separators=(",", ":"))
        sep = ","
    yield "]}"


def csv_pieces(found: Iterable[tuple[str, Box]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for n, (feature_id, b) in enumerate(found, 1):
        writer.writerow((feature_id, b.label, b.class_id, b.score, b.x1, b.y1, b.x2, b.y2))
        if n % 1000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def gzipped(chunks: Iterable[bytes]) -> Iterator[bytes]:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    for chunk in chunks:
        if out := packer.compress(chunk):
            yield out
    yield packer.flush()


def _accepts_gzip(accept_encoding: str | None) -> bool:
    for part in (accept_encoding or "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "*") and params.replace(" ", "") != "q=0":
            return True
    return False


@router.get(
    "/slides/{slide_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/geo+json": {}, "text/csv": {}}},
        **NOT_FOUND,
    },
    summary="Every detection of a slide in level-0 pixels, as QuPath GeoJSON or CSV",
)
def export_slide(
    slide_id: str,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
    fmt: Annotated[SlideExportFormat, Query(alias="format")] = SlideExportFormat.geojson,
    accept_encoding: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    slide = slide_or_404(session, slide_id, caller.tenant)
    audit.commit(session, caller, Action.export, ObjectType.slide, slide.id, format=fmt.value)
    session.close()
    found = iter_detections(res.sessions, slide.id, res.settings.export_page_size)
    pieces = geojson_pieces(found) if fmt is SlideExportFormat.geojson else csv_pieces(found)
    body: Iterator[bytes] = chunked(pieces)
    suffix = ".geojson" if fmt is SlideExportFormat.geojson else ".csv"
    headers = {"Content-Disposition": f'attachment; filename="hepato-slide-{slide.id}{suffix}"'}
    if _accepts_gzip(accept_encoding):
        body = gzipped(body)
        headers["Content-Encoding"] = "gzip"
    headers["Vary"] = "Accept-Encoding"
    return StreamingResponse(body, media_type=_MEDIA[fmt], headers=headers)


def _png(
    res: ResourcesDep, caller: Caller, slide_id: uuid.UUID, key: str | None, what: str
) -> Response:
    if key is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the slide has no {what} yet")
    try:
        data = res.store.get(key)
    except ObjectMissing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the slide's {what} is gone") from None
    except ObjectFetchError:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the object store is unavailable"
        ) from None
    # After the store answered; the request's session is closed by now.
    image = what.replace(" ", "_")
    audit.record_now(
        res.engine, caller, Action.read_slide_image, ObjectType.slide, slide_id, image=image
    )
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get(
    "/slides/{slide_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **NOT_FOUND},
    summary="The slide's thumbnail (from its pyramid, never its label or macro image)",
)
def slide_thumbnail(
    slide_id: str, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> Response:
    slide = slide_or_404(session, slide_id, caller.tenant)
    session.close()
    return _png(res, caller, slide.id, slide.thumbnail_key, "thumbnail")


@router.get(
    "/slides/{slide_id}/tissue_mask",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **NOT_FOUND},
    summary="The slide's tissue mask (white: tissue), at about 8 µm per pixel",
)
def slide_tissue_mask(
    slide_id: str, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> Response:
    slide = slide_or_404(session, slide_id, caller.tenant)
    session.close()
    return _png(res, caller, slide.id, slide.mask_key, "tissue mask")
