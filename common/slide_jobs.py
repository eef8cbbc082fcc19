"""A whole slide's rows: accepting it (its slide, batch and planning job), and the
fenced commit of its plan (the tile jobs, all in one statement).

    submit → slide pending, one 'plan' job pending (the slide id is its batch id)
    a worker claims the plan job, reads the slide, and commits the plan:
        tile jobs inserted pending, slide processing, plan job done — one transaction
    tile jobs run as ordinary jobs; the one that ends last finishes the slide
    (common.slide_finish)

The plan commit goes through the same fence as every write after a claim: a worker that
lost its lease commits nothing, so a slide is planned once even if two workers ran its
plan job. Tile ids are pushed to Redis only after the commit, as any job's."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, insert, select, update

from hepato.common import event_log
from hepato.common.constants import JobState, Priority
from hepato.common.db import insert_rows
from hepato.common.ids import new_job_id
from hepato.common.jobs import Requeue, _owned
from hepato.common.manifest import ModelManifest
from hepato.common.room import Room, hold_room
from hepato.common.slide_schemas import SlideState
from hepato.common.slides.grid import Tile, TileGeometry
from hepato.common.tables import Batch, Job, Slide


@dataclass(frozen=True)
class NewSlide:
    """One accepted slide file, already in the object store."""

    filename: str
    object_key: str
    format: str
    size_bytes: int
    deidentify: bool = False
    # µm per pixel for a slide that names none; ignored when it does.
    mpp: float | None = None


@dataclass(frozen=True)
class AcceptedSlide:
    slide_id: uuid.UUID
    plan_job_id: uuid.UUID


def create(
    engine: Engine,
    new: NewSlide,
    *,
    tenant: str,
    model: ModelManifest,
    priority: Priority,
    max_attempts: int,
    deadline_s: float | None,
    callback_url: str | None,
    room: Room | None = None,
) -> AcceptedSlide:
    """Commit the slide, its batch and its plan job in one transaction; the caller pushes
    the plan job's id after this returns."""
    slide_id, plan_id = uuid.uuid4(), new_job_id()
    deadline_at = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s else None
    with event_log.transaction(engine) as conn:
        if room is not None:
            hold_room(conn, model.name, tenant, 1, room)
        conn.execute(
            insert(Batch).values(
                id=slide_id,
                tenant=tenant,
                model=model.name,
                priority=priority.value,
                total=1,
                # The slide's own webhook (slide.finished, with its summary) reports it.
                callback_url=None,
            )
        )
        conn.execute(
            insert(Slide).values(
                id=slide_id,
                tenant=tenant,
                filename=new.filename,
                object_key=new.object_key,
                format=new.format,
                size_bytes=new.size_bytes,
                model=model.name,
                priority=priority.value,
                state=SlideState.pending.value,
                deidentify=new.deidentify,
                deidentified=False,
                submitted_mpp=new.mpp,
                tiles_total=0,
                callback_url=callback_url,
            )
        )
        conn.execute(
            insert(Job).values(
                id=plan_id,
                batch_id=slide_id,
                kind="plan",
                tenant=tenant,
                filename=new.filename,
                object_key=new.object_key,
                image_format=new.format[:16],
                size_bytes=new.size_bytes,
                width=0,
                height=0,
                model=model.name,
                task=model.task,
                priority=priority.value,
                state=JobState.pending.value,
                attempts=0,
                max_attempts=max_attempts,
                deadline_at=deadline_at,
            )
        )
        event_log.record(conn, [plan_id])
    return AcceptedSlide(slide_id, plan_id)


@dataclass(frozen=True)
class SlideToPlan:
    """What a worker needs of a slide to plan it, read when it claims the plan job."""

    slide_id: uuid.UUID
    object_key: str
    filename: str
    format: str
    deidentify: bool
    submitted_mpp: float | None


def to_plan(engine: Engine, slide_id: uuid.UUID) -> SlideToPlan | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(
                Slide.id,
                Slide.object_key,
                Slide.filename,
                Slide.format,
                Slide.deidentify,
                Slide.submitted_mpp,
            ).where(Slide.id == slide_id)
        ).first()
    return SlideToPlan(*row) if row else None


@dataclass(frozen=True)
class Plan:
    """A slide as a worker read it, and the tiles of tissue it cut."""

    width: int
    height: int
    levels: int
    mpp: tuple[float, float]
    mpp_source: str  # 'slide' or 'submitted'
    objective_power: float | None
    tile_size: int
    tile_overlap: int
    tissue_area_mm2: float
    thumbnail_key: str
    mask_key: str
    tiles: Sequence[Tile]
    # The slide's object now: a de-identified copy's key replaces the upload's.
    object_key: str
    deidentified: bool = False
    # The grid's level-0 tile size and stride (common.slides.grid.tile_geometry); None
    # leaves the slide's grid columns null.
    geometry: TileGeometry | None = None


def commit_plan(
    engine: Engine, token: uuid.UUID, plan_job_id: uuid.UUID, slide_id: uuid.UUID, plan: Plan
) -> list[Requeue] | None:
    """Insert the plan's tile jobs, mark the slide planned and the plan job done, in one
    transaction, if this lease still owns the plan job; None if it does not (another
    worker took it over). Returns the tile jobs to push after the commit."""
    tile_ids = [new_job_id() for _ in plan.tiles]
    geo = plan.geometry
    with event_log.transaction(engine) as conn:
        owner = conn.execute(
            select(Job.tenant, Job.model, Job.task, Job.priority, Job.max_attempts, Job.deadline_at)
            .where(_owned(token, [plan_job_id]))
            .with_for_update()
        ).first()
        if owner is None:
            return None
        slide = conn.execute(
            select(Slide.filename, Slide.format, Slide.size_bytes).where(Slide.id == slide_id)
        ).one()
        if tile_ids:
            _insert_tiles(conn, tile_ids, plan, slide_id, owner._mapping, slide._mapping)
        conn.execute(
            update(Slide)
            .where(Slide.id == slide_id)
            .values(
                state=SlideState.processing.value,
                object_key=plan.object_key,
                deidentified=plan.deidentified,
                width=plan.width,
                height=plan.height,
                levels=plan.levels,
                mpp_x=plan.mpp[0],
                mpp_y=plan.mpp[1],
                mpp_source=plan.mpp_source,
                objective_power=plan.objective_power,
                tile_size=plan.tile_size,
                tile_overlap=plan.tile_overlap,
                tile_w0=geo.w if geo else None,
                tile_h0=geo.h if geo else None,
                tile_stride_x=geo.stride_x if geo else None,
                tile_stride_y=geo.stride_y if geo else None,
                tissue_area_mm2=plan.tissue_area_mm2,
                thumbnail_key=plan.thumbnail_key,
                mask_key=plan.mask_key,
                tiles_total=len(tile_ids),
                planned_at=func.now(),
            )
        )
        conn.execute(update(Batch).where(Batch.id == slide_id).values(total=len(tile_ids) + 1))
        conn.execute(
            update(Job)
            .where(Job.id == plan_job_id)
            .values(
                state=JobState.done,
                finished_at=func.now(),
                lease_until=None,
                error=None,
                object_key=plan.object_key,
            )
        )
        if tile_ids:
            event_log.record(conn, (), where=and_(Job.batch_id == slide_id, Job.kind == "tile"))
        # Last: with no tile of tissue, this ends the slide (common.slide_finish).
        event_log.record(conn, [plan_job_id])
    return [Requeue(tile_id, owner.model, owner.priority, owner.tenant) for tile_id in tile_ids]


def _insert_tiles(
    conn: Any,
    tile_ids: list[uuid.UUID],
    plan: Plan,
    slide_id: uuid.UUID,
    owner: Any,
    slide: Any,
) -> None:
    tiles = plan.tiles
    per_row: dict[str, list[Any]] = {
        "id": tile_ids,
        "tile_x": [t.x for t in tiles],
        "tile_y": [t.y for t in tiles],
        "tile_w": [t.w for t in tiles],
        "tile_h": [t.h for t in tiles],
        "core_x0": [t.core_x0 for t in tiles],
        "core_y0": [t.core_y0 for t in tiles],
        "core_x1": [t.core_x1 for t in tiles],
        "core_y1": [t.core_y1 for t in tiles],
        "width": [t.w for t in tiles],
        "height": [t.h for t in tiles],
    }
    same = {
        "batch_id": slide_id,
        "kind": "tile",
        "tenant": owner["tenant"],
        "filename": slide["filename"],
        "object_key": plan.object_key,
        "image_format": slide["format"][:16],
        "size_bytes": 0,
        "model": owner["model"],
        "task": owner["task"],
        "priority": owner["priority"],
        "state": JobState.pending.value,
        "attempts": 0,
        "max_attempts": owner["max_attempts"],
        "deadline_at": owner["deadline_at"],
    }
    insert_rows(conn, Job, per_row, same)
