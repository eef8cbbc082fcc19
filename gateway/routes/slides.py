"""Whole slides: submit one, read its state and summary, follow it live, cancel it.

``POST /v1/slides``, ``GET /v1/slides``, ``GET|DELETE /v1/slides/{id}`` and
``GET /v1/slides/{id}/events``. Exports and images of a slide are in
gateway.routes.slide_results. Nothing answered here is read from the slide file: label,
macro and scanner metadata never reach a response."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Form, Request, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent

from hepato.common import audit, event_log, jobs, schemas
from hepato.common.audit import Action, ObjectType
from hepato.common.constants import Priority, batch_events_channel
from hepato.common.slide_finish import tile_counts
from hepato.common.slide_schemas import (
    SLIDE_TERMINAL_STATES,
    SlideAccepted,
    SlideOut,
    SlideState,
    SlideSummary,
)
from hepato.common.tables import Slide
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import ResourcesDep, SessionDep
from hepato.gateway.idempotency import IdempotencyDep
from hepato.gateway.lookups import NOT_FOUND, public_url, slide_or_404
from hepato.gateway.routes.live import HubDep, LastEventId, event_stream, resume_point
from hepato.gateway.routes.submissions import (
    CallbackField,
    DeadlineField,
    ModelField,
    model_or_422,
)
from hepato.gateway.slide_submit import SlideUpload, submit_slide

router = APIRouter(prefix="/v1", tags=["slides"])

# Progress of a slide's tiles comes in bursts (one per microbatch): one read per this long.
COALESCE_S = 0.25


def slide_out(session: Session, slide: Slide) -> SlideOut:
    return SlideOut(
        id=slide.id,
        state=SlideState(slide.state),
        filename=slide.filename,
        format=slide.format,
        size_bytes=slide.size_bytes,
        model=slide.model,
        model_version=slide.model_version,
        width=slide.width,
        height=slide.height,
        mpp=(slide.mpp_x, slide.mpp_y) if slide.mpp_x and slide.mpp_y else None,
        mpp_source=slide.mpp_source,
        levels=slide.levels,
        objective_power=slide.objective_power,
        tile_size=slide.tile_size,
        tile_overlap=slide.tile_overlap,
        deidentified=slide.deidentified,
        tiles=tile_counts(session.connection(), slide.id),
        summary=SlideSummary.model_validate(slide.summary) if slide.summary else None,
        error=schemas.public_error(slide.error),
        created_at=slide.created_at,
        planned_at=slide.planned_at,
        finished_at=slide.finished_at,
    )


SlideFile = Annotated[UploadFile, File(description="One whole-slide file (SVS, NDPI, TIFF, ...)")]
MppField = Annotated[
    float | None,
    Form(gt=0, le=100, description="µm per level-0 pixel, for a slide whose file names none"),
]
DeidentifyField = Annotated[
    bool,
    Form(description="Replace the stored slide by a copy without label, macro and scanner data"),
]


@router.post(
    "/slides",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SlideAccepted,
    responses=schemas.errors(400, 413, 415, 422, 429, 503),
    summary="Submit a whole-slide image",
)
async def submit(
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    idempotency: IdempotencyDep,
    file: SlideFile,
    model: ModelField = None,
    priority: Annotated[Priority, Form()] = Priority.routine,
    deadline_s: DeadlineField = None,
    callback_url: CallbackField = None,
    deidentify: DeidentifyField = False,
    mpp: MppField = None,
) -> SlideAccepted | Response:
    async def run() -> SlideAccepted:
        manifest = model_or_422(res, model)
        sub = await run_in_threadpool(
            submit_slide,
            res,
            SlideUpload(file.filename or "unnamed", file.file),
            caller=caller,
            model=manifest,
            priority=priority,
            deadline_s=deadline_s,
            callback_url=str(callback_url) if callback_url else None,
            deidentify=deidentify,
            mpp=mpp,
        )
        sid = str(sub.slide_id)
        return SlideAccepted(
            slide_id=sub.slide_id,
            status_url=public_url(request, res, "get_slide", slide_id=sid),
            events_url=public_url(request, res, "slide_events", slide_id=sid),
            filename=sub.filename,
            format=sub.format,
            size_bytes=sub.size_bytes,
        )

    return await idempotency.run(status.HTTP_202_ACCEPTED, run)


@router.get("/slides", summary="The tenant's slides, newest first")
def list_slides(
    session: SessionDep, caller: CallerDep, limit: int = 50
) -> dict[str, list[SlideOut]]:
    rows = session.scalars(
        select(Slide)
        .where(Slide.tenant == caller.tenant)
        .order_by(Slide.created_at.desc())
        .limit(max(1, min(limit, 500)))
    ).all()
    slides = [slide_out(session, s) for s in rows]
    audit.commit(session, caller, Action.list_slides, count=len(slides))
    return {"slides": slides}


@router.get(
    "/slides/{slide_id}",
    response_model=SlideOut,
    responses=NOT_FOUND,
    summary="A slide's state, metadata, tiles by state and summary",
)
def get_slide(slide_id: str, session: SessionDep, caller: CallerDep) -> SlideOut:
    out = slide_out(session, slide_or_404(session, slide_id, caller.tenant))
    audit.commit(session, caller, Action.read_slide, ObjectType.slide, out.id)
    return out


@router.delete(
    "/slides/{slide_id}",
    responses=NOT_FOUND,
    summary="Cancel what of a slide has not started (its tiles that are still pending)",
)
def cancel_slide(
    slide_id: str, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> dict[str, object]:
    slide = slide_or_404(session, slide_id, caller.tenant)
    session.close()
    canceled = jobs.cancel(res.engine, batch_id=slide.id)
    audit.record_now(
        res.engine, caller, Action.cancel, ObjectType.slide, slide.id, canceled=canceled
    )
    return {"slide_id": str(slide.id), "canceled": canceled}


def _snapshot(
    sessions: sessionmaker[Session], slide_id: uuid.UUID, tenant: str
) -> tuple[event_log.Cursor, SlideOut]:
    # The cursor first: a change committed after it shows in the snapshot and again at
    # the next wake-up, never not at all. The cursor only grows: a later event, even one
    # held back now behind an older transaction, comes in above it (common.event_log).
    with sessions() as session:
        cursor = event_log.last(session.connection(), slide_id)
        return cursor, slide_out(session, slide_or_404(session, str(slide_id), tenant))


async def _stream(
    res: ResourcesDep,
    hub: HubDep,
    slide_id: uuid.UUID,
    tenant: str,
    after: event_log.Cursor | None,
) -> AsyncIterator[ServerSentEvent]:
    async with hub.wakeup(batch_events_channel(str(slide_id)), COALESCE_S) as wake:
        while True:
            cursor, out = await anyio.to_thread.run_sync(_snapshot, res.sessions, slide_id, tenant)
            if cursor != after or out.state in SLIDE_TERMINAL_STATES:
                yield ServerSentEvent(
                    out.model_dump_json(), event="slide", id=event_log.format_cursor(cursor)
                )
                after = cursor
            if out.state in SLIDE_TERMINAL_STATES:
                return
            await wake.wait(res.settings.events_poll_interval_s)


@router.get(
    "/slides/{slide_id}/events",
    response_class=EventSourceResponse,
    responses=NOT_FOUND,
    summary="A slide's progress (Server-Sent Events): `event: slide` with the slide's "
    "state and tiles by state at each change; the stream ends once the slide is finished",
)
def slide_events(
    slide_id: str,
    res: ResourcesDep,
    hub: HubDep,
    caller: CallerDep,
    last_event_id: LastEventId,
) -> EventSourceResponse:
    with res.sessions() as session:
        slide = slide_or_404(session, slide_id, caller.tenant)
        audit.commit(
            session,
            caller,
            Action.watch,
            ObjectType.slide,
            slide.id,
            resume_after=resume_point(last_event_id),
        )
    return event_stream(res, _stream(res, hub, slide.id, caller.tenant, last_event_id))
