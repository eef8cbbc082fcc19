"""Deep-zoom tiles of a slide for a viewer (OpenSeadragon): its ``.dzi`` descriptor and
its JPEG tiles, read from the stored slide with the workers' reader.

The gateway keeps its own local copy of a viewed slide (common.slides.cache.SlideCache,
in the process's lifespan) and an LRU of rendered tiles; the answers carry a strong ETag
and may be kept by the browser for a day, so panning back over a region costs nothing.
The routes are plain functions: FastAPI runs them in its thread pool, so copying a slide
or rendering a tile never holds the event loop. Only regions of the pyramid are read:
a slide's label and macro photographs cannot reach a tile."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import Response
from sqlalchemy.orm import Session

from hepato.common import audit, schemas
from hepato.common.audit import Action, ObjectType
from hepato.common.exceptions import InvalidSlide, ObjectFetchError, ObjectMissing
from hepato.common.slides import deepzoom
from hepato.common.slides.reader import SlideReader
from hepato.common.tables import Slide
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import Resources, ResourcesDep, SessionDep
from hepato.gateway.lookups import NOT_FOUND, slide_or_404

router = APIRouter(prefix="/v1", tags=["slides"])

R = TypeVar("R")

CACHE_CONTROL = "private, max-age=86400"
# Changes with anything that changes a tile's bytes for the same slide, so a browser's
# copy made by another rendering is not taken for the current one.
RENDERING = f"{deepzoom.TILE_SIZE}/{deepzoom.OVERLAP}/{deepzoom.FORMAT}/{deepzoom.JPEG_QUALITY}"
RETRY_AFTER_S = "5"
RESPONSES: dict[int | str, dict[str, Any]] = {
    304: {"description": "If-None-Match named this answer's ETag"},
    **NOT_FOUND,
    409: {"model": schemas.ErrorOut, "description": "The slide waits for its de-identified copy"},
    422: {"model": schemas.Unprocessable, "description": "A bad field, or an unreadable slide"},
    **schemas.errors(503),
}


def _viewable(session: Session, slide_id: str, tenant: str) -> Slide:
    """The tenant's slide (404 as for any id otherwise), unless it waits for its
    de-identified copy: until then the stored file is the original, label included, and
    the gateway does not copy it."""
    slide = slide_or_404(session, slide_id, tenant)
    if slide.deidentify and not slide.deidentified:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"slide {slide_id} was submitted with deidentify=true and has no de-identified "
            "copy (yet): it is viewed only from that copy, which its planning makes",
        )
    session.close()
    return slide


def _etag(*parts: object) -> str:
    digest = hashlib.sha256("|".join(map(str, (RENDERING, *parts))).encode()).hexdigest()
    return f'"{digest[:32]}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match against our ETag: the weak comparison RFC 9110 prescribes for it."""
    for tag in (if_none_match or "").split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _headers(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def _read(res: Resources, slide: Slide, use: Callable[[SlideReader], R]) -> R:
    """``use`` on the open reader of the gateway's copy of the slide (fetched now if it
    has none), with the store's and the file's failures as answers."""
    key = slide.object_key
    try:
        with res.slide_cache.reader(key) as reader:
            return use(reader)
    except ObjectMissing:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"the file of slide {slide.id} is gone from the object store",
        ) from None
    except ObjectFetchError:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the object store is unavailable; retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    except InvalidSlide as exc:
        # A failed read leaves OpenSlide's handle refusing every later one.
        res.slide_cache.reopen(key)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"slide {slide.id} cannot be read: {exc}"
        ) from None


def _dimensions(res: Resources, slide: Slide) -> tuple[int, int]:
    """Level-0 (width, height): from the row once planned, else from the slide itself."""
    if slide.width is not None and slide.height is not None:
        return slide.width, slide.height
    return _read(res, slide, lambda reader: reader.dimensions)


@router.get(
    "/slides/{slide_id}/dzi",
    response_class=Response,
    responses={200: {"content": {"application/xml": {}}}, **RESPONSES},
    summary="The slide's Deep Zoom descriptor (.dzi) for OpenSeadragon",
)
def slide_dzi(
    slide_id: str,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    slide = _viewable(session, slide_id, caller.tenant)
    etag = _etag(slide.object_key, "dzi")
    # Rows after the answer is known good: the session is closed by now (a slide's first
    # copy can take long), so each is one autocommit INSERT of its own.
    if _matches(if_none_match, etag):
        audit.record_now(
            res.engine, caller, Action.read_slide_dzi, ObjectType.slide, slide.id, not_modified=True
        )
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=_headers(etag))
    width, height = _dimensions(res, slide)
    audit.record_now(res.engine, caller, Action.read_slide_dzi, ObjectType.slide, slide.id)
    return Response(
        deepzoom.descriptor_xml(width, height), media_type="application/xml", headers=_headers(etag)
    )


@router.get(
    "/slides/{slide_id}/dzi_files/{level}/{col}_{row}.jpeg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **RESPONSES},
    summary="One Deep Zoom tile of the slide (JPEG), read from its pyramid",
)
def slide_dzi_tile(
    slide_id: str,
    level: int,
    col: int,
    row: int,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    slide = _viewable(session, slide_id, caller.tenant)
    key = (slide.object_key, level, col, row)
    etag = _etag(*key)
    tile = {"level": level, "col": col, "row": row}
    # Before the range check: a slide not planned yet needs its copy for its size, and a
    # tag we issued names a tile in range.
    if _matches(if_none_match, etag):
        audit.record_now(
            res.engine,
            caller,
            Action.read_slide_tile,
            ObjectType.slide,
            slide.id,
            not_modified=True,
            **tile,
        )
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=_headers(etag))
    width, height = _dimensions(res, slide)
    try:
        deepzoom.tile_rect(width, height, level, col, row)
    except ValueError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such tile: {exc}") from None
    data = res.tiles.get(key)
    if data is None:
        data = _read(res, slide, lambda reader: deepzoom.render_tile(reader, level, col, row))
        res.tiles.put(key, data)
    audit.record_now(res.engine, caller, Action.read_slide_tile, ObjectType.slide, slide.id, **tile)
    return Response(data, media_type="image/jpeg", headers=_headers(etag))
