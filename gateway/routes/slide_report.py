"""``GET /v1/slides/{id}/report``: a slide's one-page HTML report, printable to PDF from
the browser (gateway.slide_report_render draws it).

What it shows is what GET /v1/slides/{id} answers (the same SlideOut), the thumbnail the
planning worker rendered from the pyramid, and each done tile's detection count from its
``tile_stats``: never the slide's label, macro or scanner metadata. A slide that is not
finished gets a report too, saying how far it is."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlalchemy import Connection, select, text

from hepato.common import audit
from hepato.common.audit import Action, ObjectType
from hepato.common.exceptions import ObjectMissing
from hepato.common.tables import Job
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import ResourcesDep, SessionDep
from hepato.gateway.lookups import NOT_FOUND, slide_or_404
from hepato.gateway.routes.slides import slide_out
from hepato.gateway.slide_report_render import Overlay, TileCount, render_overlay, render_report

router = APIRouter(prefix="/v1", tags=["slides"])

# Each done tile with a detection: its core and its count over every class. One row per
# tile (tens of thousands on a large slide: a few MB at most), read through
# ix_jobs_batch_state_created.
_TILE_COUNTS = text(
    "SELECT j.core_x0, j.core_y0, j.core_x1, j.core_y1, "
    "sum((c.value->>'count')::bigint)::bigint AS n "
    "FROM jobs j CROSS JOIN LATERAL jsonb_each(j.tile_stats->'classes') AS c(key, value) "
    "WHERE j.batch_id = :slide AND j.kind = 'tile' AND j.state = 'done' "
    "AND j.core_x0 IS NOT NULL "
    "GROUP BY j.id HAVING sum((c.value->>'count')::bigint) > 0"
)

HEADERS = {
    # A report changes until the slide is finished, and names the client's filename.
    "Cache-Control": "private, no-cache",
    "X-Content-Type-Options": "nosniff",
    # The page loads nothing: inline style, the image a data: URI, no script at all.
    "Content-Security-Policy": (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


def tile_counts_of(conn: Connection, slide_id: uuid.UUID) -> list[TileCount]:
    return [
        TileCount(int(x0), int(y0), int(x1), int(y1), int(n))
        for x0, y0, x1, y1, n in conn.execute(_TILE_COUNTS, {"slide": slide_id})
    ]


def _model_version(conn: Connection, slide_id: uuid.UUID) -> str | None:
    """The version of a done tile's result: the slide's own is set when it finishes."""
    return conn.execute(
        select(Job.model_version)
        .where(Job.batch_id == slide_id, Job.kind == "tile", Job.model_version.is_not(None))
        .limit(1)
    ).scalar()


@router.get(
    "/slides/{slide_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}}, **NOT_FOUND},
    summary="A one-page HTML report of the slide (metadata without patient data, the "
    "thumbnail with a detection heat map, the summary), printable to PDF; research use only",
)
def slide_report(
    slide_id: str, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> HTMLResponse:
    slide = slide_or_404(session, slide_id, caller.tenant)
    out = slide_out(session, slide)
    conn = session.connection()
    tiles = tile_counts_of(conn, slide.id)
    version = out.model_version or _model_version(conn, slide.id)
    key = slide.thumbnail_key
    session.close()

    overlay: Overlay | None = None
    note: str | None = None
    if key is not None and out.width and out.height:
        try:
            thumbnail = res.store.get(key)
        except ObjectMissing:
            note = "The slide's thumbnail is gone from the object store."
        else:
            overlay = render_overlay(thumbnail, tiles, (out.width, out.height), out.mpp)
    page = render_report(
        out, overlay, model_version=version, generated_at=datetime.now(UTC), image_note=note
    )
    # The session was closed before the thumbnail was fetched: a row of its own.
    audit.record_now(res.engine, caller, Action.read_report, ObjectType.slide, slide.id)
    return HTMLResponse(page, headers=HEADERS)
