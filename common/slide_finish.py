"""Finishing a whole slide: in the transaction that ends its last job, its state and
summary (per class: count, count per mm² of tissue, fraction of tissue its boxes cover).

Called by common.event_log.record once it holds the slide's finish lock (an advisory
lock per batch, taken by the writers of a slide's terminal transitions only), so
transactions that end a slide's jobs run this one after another, each reading after the
lock what the ones before committed, and exactly one of them sees the last job end, as
for a batch's webhook. The summary is sums over the tiles' own statistics
(``jobs.tile_stats``, written with each tile's result): no detection is re-read."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert

from hepato.common import webhooks
from hepato.common.constants import TERMINAL_STATES, JobState
from hepato.common.schemas import public_error
from hepato.common.slide_schemas import (
    ClassSummary,
    SlideState,
    SlideSummary,
    TileCounts,
    steatosis_band,
)
from hepato.common.tables import Job, Slide, WebhookDelivery

# A class name that gets a NASH CRN band in the summary (the liver use case).
STEATOSIS = "steatosis"
_OPEN = (SlideState.pending.value, SlideState.processing.value)
# Per class, the sums of the done tiles' own counts and covered areas.
_CLASS_SUMS = text(
    "SELECT c.key, sum((c.value->>'count')::bigint)::bigint, sum((c.value->>'cover')::float8) "
    "FROM jobs j CROSS JOIN LATERAL jsonb_each(j.tile_stats->'classes') AS c(key, value) "
    "WHERE j.batch_id = :slide AND j.kind = 'tile' AND j.state = 'done' "
    "GROUP BY c.key ORDER BY c.key"
)


def finish_slides(conn: Connection, recorded: Sequence[tuple[uuid.UUID, Any, str]]) -> None:
    """Finish the slides whose last job one of ``recorded`` (job, batch, state) ended."""
    batches = {
        batch for _, batch, state in recorded if batch is not None and state in TERMINAL_STATES
    }
    if not batches:
        return
    open_slides = conn.execute(
        select(Slide.id).where(Slide.id.in_(batches), Slide.state.in_(_OPEN)).with_for_update()
    ).scalars()
    for slide_id in list(open_slides):
        unfinished = conn.execute(
            select(
                exists().where(
                    Job.batch_id == slide_id,
                    Job.state.in_([JobState.pending, JobState.processing]),
                )
            )
        ).scalar_one()
        if not unfinished:
            _finish(conn, slide_id)


def tile_counts(conn: Connection, slide_id: uuid.UUID) -> TileCounts:
    counts: dict[str, int] = {}
    for state, n in conn.execute(
        select(Job.state, func.count())
        .where(Job.batch_id == slide_id, Job.kind == "tile")
        .group_by(Job.state)
    ):
        counts[state] = n
    return TileCounts(total=sum(counts.values()), **counts)


def _finish(conn: Connection, slide_id: uuid.UUID) -> None:
    slide = conn.execute(select(Slide.__table__).where(Slide.id == slide_id)).one()
    plan_state, plan_error = conn.execute(
        select(Job.state, Job.error).where(Job.batch_id == slide_id, Job.kind == "plan")
    ).one()
    tiles = tile_counts(conn, slide_id)
    summary: SlideSummary | None = None
    error: str | None = None
    if plan_state == JobState.canceled or tiles.canceled:
        state = SlideState.canceled
    elif plan_state != JobState.done:
        state, error = SlideState.failed, plan_error or f"planning ended {plan_state}"
    else:
        state = SlideState.done_with_failures if tiles.failed or tiles.expired else SlideState.done
    if state is not SlideState.failed:
        summary = _summary(conn, slide, tiles)
    version = conn.execute(
        select(Job.model_version)
        .where(Job.batch_id == slide_id, Job.kind == "tile", Job.model_version.is_not(None))
        .limit(1)
    ).scalar()
    conn.execute(
        update(Slide)
        .where(Slide.id == slide_id)
        .values(
            state=state.value,
            error=error,
            summary=summary.model_dump(mode="json") if summary else None,
            finished_at=func.now(),
            model_version=version,
        )
    )
    if slide.callback_url:
        data = {
            "slide_id": str(slide_id),
            "state": state.value,
            "error": public_error(error),
            "summary": summary.model_dump(mode="json") if summary else None,
        }
        row = webhooks.delivery_row(
            slide_id,
            slide.tenant,
            slide.callback_url,
            "slide.finished",
            datetime.now(UTC).isoformat(),
            data,
        )
        # The id is the slide's: a second enqueue of it is a no-op.
        conn.execute(insert(WebhookDelivery).on_conflict_do_nothing(), [row])


def _summary(conn: Connection, slide: Any, tiles: TileCounts) -> SlideSummary:
    rows = conn.execute(_CLASS_SUMS, {"slide": slide.id}).all()
    tissue = slide.tissue_area_mm2 or 0.0
    px_mm2 = (slide.mpp_x or 0.0) * (slide.mpp_y or 0.0) / 1e6
    classes = [
        ClassSummary(
            label=label,
            count=int(count or 0),
            per_mm2=(count or 0) / tissue if tissue else 0.0,
            area_fraction=min(1.0, (cover or 0.0) * px_mm2 / tissue) if tissue else 0.0,
        )
        for label, count, cover in rows
    ]
    band = next((steatosis_band(c.area_fraction) for c in classes if c.label == STEATOSIS), None)
    return SlideSummary(tissue_area_mm2=tissue, tiles=tiles, classes=classes, steatosis_band=band)
