"""Detections by region: ``GET /v1/slides/{id}/detections?x=&y=&w=&h=`` answers the boxes
of a level-0 rectangle of a slide, or, where it holds more than ``limit``, a density grid
per class, read from Postgres.

Which boxes: every box that overlaps the rectangle (a positive area in common), not only
those centred in it, so a viewer draws the boxes its viewport's edge cuts. A box lies in
the tile that found it, so only tiles that meet the rectangle can hold one.

Which tiles, and at what cost: a slide's tiles start at multiples of its level-0 stride
(common.slides.grid), so the rows of tiles that meet the rectangle are a short list of
known ``tile_y`` values and their columns a range of ``tile_x``. The partial index
``ix_jobs_tile_grid (batch_id, tile_y, tile_x) WHERE kind = 'tile'`` answers
``tile_y = ANY(rows) AND tile_x BETWEEN c0 AND c1`` with one descent per row, visiting
only the viewport's tiles: a viewport costs the same on a slide of 100 boxes as on one of
100,000. (A slide planned before its stride was stored takes its rows as a range.)

Boxes or density: decided before any box is read, from the tiles' own statistics
(``tile_stats``: per class, the detections centred in the tile's core). Their sum over the
tiles that meet the rectangle is an upper bound of the boxes it holds (``labels`` applied;
``min_score`` not, the statistics hold no scores). Past ``limit``, the answer is a grid of
square cells of ``cell`` level-0 px anchored at the slide's origin (so cells stay put as
the viewer pans), a whole number of tile strides a side; each tile's counts go to the cell
holding its core's centre, summed in SQL; cells with nothing are left out."""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

from hepato.common import audit
from hepato.common.audit import Action, ObjectType
from hepato.common.tables import Slide
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import SessionDep
from hepato.gateway.lookups import NOT_FOUND, slide_or_404

router = APIRouter(prefix="/v1", tags=["slides"])

DEFAULT_LIMIT = 2000
MAX_LIMIT = 20000
# About this many density cells across the viewport's longer side (never under a tile).
CELLS_ACROSS = 64
_COORD = 2**31 - 1


class RegionBox(BaseModel):
    id: uuid.UUID = Field(description="The detection's feature id, as in the slide's exports")
    label: str
    class_id: int
    score: float
    x1: float = Field(description="Left edge, level-0 px")
    y1: float
    x2: float
    y2: float


class RegionBoxes(BaseModel):
    mode: Literal["boxes"] = "boxes"
    boxes: list[RegionBox]
    count: int


class DensityCell(BaseModel):
    x: int = Field(description="Left edge of the cell, level-0 px")
    y: int
    w: int
    h: int
    counts: dict[str, int] = Field(description="Detections per class centred in its tiles")


class RegionDensity(BaseModel):
    mode: Literal["density"] = "density"
    cell: int = Field(description="Side of a cell, level-0 px")
    cells: list[DensityCell]
    count: int


RegionAnswer = Annotated[RegionBoxes | RegionDensity, Field(discriminator="mode")]


@dataclass(frozen=True)
class Window:
    """The half-open level-0 rectangle [x0, x1) x [y0, y1), clipped to the slide, and
    the tiles that meet it: columns ``col0..col1`` and ``rows`` (or ``row0..row1``)."""

    x0: int
    y0: int
    x1: int
    y1: int
    col0: int
    col1: int
    rows: list[int] | None
    row0: int
    row1: int
    unit: int  # the smallest density cell: one tile stride


def tile_window(slide: Slide, x: int, y: int, w: int, h: int) -> Window | None:
    """The rectangle's tiles, or None when the slide has none there (not planned yet,
    or the rectangle misses the slide)."""
    if not (slide.width and slide.height and slide.tile_w0 and slide.tile_h0):
        return None
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, slide.width), min(y + h, slide.height)
    if x0 >= x1 or y0 >= y1:
        return None
    # A tile [s, s + size) meets [a, b) when a - size < s < b.
    col0, col1 = max(0, x0 - slide.tile_w0 + 1), x1 - 1
    row0, row1 = max(0, y0 - slide.tile_h0 + 1), y1 - 1
    rows = None
    if slide.tile_stride_y:
        sy = slide.tile_stride_y
        rows = [k * sy for k in range(-(-row0 // sy), row1 // sy + 1)]
    unit = max(slide.tile_stride_x or slide.tile_w0, slide.tile_stride_y or slide.tile_h0)
    return Window(x0, y0, x1, y1, col0, col1, rows, row0, row1, unit)


def _tiles_sql(window: Window) -> str:
    """The WHERE of a viewport's done tiles: literal kind, so the partial index applies."""
    rows = (
        "j.tile_y = ANY(CAST(:rows AS integer[]))"
        if window.rows is not None
        else "j.tile_y BETWEEN :row0 AND :row1"
    )
    return (
        "j.batch_id = :slide AND j.kind = 'tile' AND j.state = 'done' "
        f"AND {rows} AND j.tile_x BETWEEN :col0 AND :col1"
    )


def _params(slide_id: uuid.UUID, window: Window) -> dict[str, Any]:
    return {
        "slide": slide_id,
        "rows": window.rows,
        "row0": window.row0,
        "row1": window.row1,
        "col0": window.col0,
        "col1": window.col1,
    }


def cell_size(window: Window) -> int:
    """A whole number of tile strides, about CELLS_ACROSS cells across the viewport."""
    across = max(window.x1 - window.x0, window.y1 - window.y0)
    return window.unit * max(1, math.ceil(across / (CELLS_ACROSS * window.unit)))


def density_query(
    slide_id: uuid.UUID, window: Window, labels: list[str] | None, cell: int
) -> tuple[TextClause, dict[str, Any]]:
    """Per cell (by the tile core's centre) and class, the sum of the tiles' counts."""
    label_sql = "AND c.key = ANY(CAST(:labels AS text[])) " if labels is not None else ""
    query = text(
        "SELECT floor((j.core_x0 + j.core_x1) / 2.0 / :cell)::int AS cx, "
        "floor((j.core_y0 + j.core_y1) / 2.0 / :cell)::int AS cy, c.key AS label, "
        "sum((c.value->>'count')::bigint)::bigint AS n "
        "FROM jobs j CROSS JOIN LATERAL jsonb_each(j.tile_stats->'classes') AS c(key, value) "
        f"WHERE {_tiles_sql(window)} {label_sql}"
        "GROUP BY 1, 2, 3 ORDER BY 2, 1, 3"
    )
    return query, {**_params(slide_id, window), "cell": cell, "labels": labels}


def boxes_query(
    slide_id: uuid.UUID,
    window: Window,
    labels: list[str] | None,
    min_score: float | None,
    limit: int,
) -> tuple[TextClause, dict[str, Any]]:
    """The boxes of the viewport's tiles that overlap it, in tile id and result order,
    with the tile's id and the box's index in its result (its feature id's parts)."""
    where = [
        "(b.box->>'x1')::float8 < :x1",
        "(b.box->>'x2')::float8 > :x0",
        "(b.box->>'y1')::float8 < :y1",
        "(b.box->>'y2')::float8 > :y0",
    ]
    if labels is not None:
        where.append("b.box->>'label' = ANY(CAST(:labels AS text[]))")
    if min_score is not None:
        where.append("(b.box->>'score')::float8 >= :min_score")
    query = text(
        "SELECT j.id, b.ord - 1, b.box->>'label', (b.box->>'class_id')::int, "
        "(b.box->>'score')::float8, (b.box->>'x1')::float8, (b.box->>'y1')::float8, "
        "(b.box->>'x2')::float8, (b.box->>'y2')::float8 "
        "FROM jobs j CROSS JOIN LATERAL "
        "jsonb_array_elements(j.result->'boxes') WITH ORDINALITY AS b(box, ord) "
        f"WHERE {_tiles_sql(window)} AND {' AND '.join(where)} "
        "ORDER BY j.id, b.ord LIMIT :limit"
    )
    params = {
        **_params(slide_id, window),
        "x0": window.x0,
        "y0": window.y0,
        "x1": window.x1,
        "y1": window.y1,
        "labels": labels,
        "min_score": min_score,
        "limit": limit,
    }
    return query, params


def density(
    session: Session, slide_id: uuid.UUID, window: Window, labels: list[str] | None
) -> RegionDensity:
    """The density grid of the viewport: no box is read."""
    cell = cell_size(window)
    cells: dict[tuple[int, int], dict[str, int]] = {}
    for cx, cy, label, n in session.execute(*density_query(slide_id, window, labels, cell)):
        if n:
            cells.setdefault((cx, cy), {})[label] = int(n)
    out = [
        DensityCell(x=cx * cell, y=cy * cell, w=cell, h=cell, counts=counts)
        for (cx, cy), counts in cells.items()
    ]
    return RegionDensity(cell=cell, cells=out, count=sum(sum(c.counts.values()) for c in out))


def feature_id(tile_id: bytes, index: int) -> str:
    """``str(uuid.uuid5(tile_job_id, str(index)))``, the exports' feature id, from the
    tile id's bytes: the same SHA-1 and bits, without building two UUID objects (a third
    of the cost of an answer of 20,000 boxes)."""
    h = hashlib.sha1(tile_id + str(index).encode(), usedforsecurity=False).hexdigest()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def boxes(
    session: Session,
    slide_id: uuid.UUID,
    window: Window,
    labels: list[str] | None,
    min_score: float | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The viewport's boxes as answered, each with its export feature id (uuid5 of the
    tile job's id and the box's index in the tile's result)."""
    rows = session.execute(*boxes_query(slide_id, window, labels, min_score, limit))
    return [
        {
            "id": feature_id(job_id.bytes, index),
            "label": label,
            "class_id": class_id,
            "score": score,
            "x1": bx1,
            "y1": by1,
            "x2": bx2,
            "y2": by2,
        }
        for job_id, index, label, class_id, score, bx1, by1, bx2, by2 in rows
    ]


def _labels(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


Coord = Annotated[int, Query(ge=-_COORD, le=_COORD, description="Level-0 px")]
Side = Annotated[int, Query(ge=1, le=_COORD, description="Level-0 px")]


@router.get(
    "/slides/{slide_id}/detections",
    response_model=RegionAnswer,
    responses={**NOT_FOUND},
    summary="The detections in a level-0 rectangle of a slide, or their density per class",
)
def slide_detections(
    slide_id: str,
    session: SessionDep,
    caller: CallerDep,
    x: Coord,
    y: Coord,
    w: Side,
    h: Side,
    labels: Annotated[
        str | None, Query(description="Comma-separated classes to answer; all when absent")
    ] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_LIMIT,
            description="Most boxes answered; past it (by the tiles' counts) a density grid",
        ),
    ] = DEFAULT_LIMIT,
) -> JSONResponse:
    """Boxes that overlap [x, x + w) x [y, y + h) in level-0 px; a density grid when the
    rectangle's tiles hold more than ``limit`` (see the module's docstring)."""
    slide = slide_or_404(session, slide_id, caller.tenant)
    wanted = _labels(labels)
    window = tile_window(slide, x, y, w, h)

    def audited(answer: dict[str, Any]) -> JSONResponse:
        audit.commit(
            session,
            caller,
            Action.read_slide_region,
            ObjectType.slide,
            slide.id,
            x=x,
            y=y,
            w=w,
            h=h,
            mode=answer["mode"],
            count=answer["count"],
        )
        return JSONResponse(answer)

    if window is None:
        return audited(RegionBoxes(boxes=[], count=0).model_dump(mode="json"))
    # One read of the tiles' counts, grouped by cell: the decision and, past the limit,
    # the answer.
    grid = density(session, slide.id, window, wanted)
    if grid.count > limit:
        return audited(grid.model_dump(mode="json"))
    found = boxes(session, slide.id, window, wanted, min_score, limit)
    return audited({"mode": "boxes", "boxes": found, "count": len(found)})
