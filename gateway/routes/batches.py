"""One batch: its state, counts and jobs, and cancelling what of it has not started.

``GET /v1/batches/{id}`` (state, counts per job state, a page of its jobs) and ``DELETE``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from hepato.common import audit, jobs, schemas
from hepato.common.audit import Action, ObjectType
from hepato.common.constants import batch_state
from hepato.common.job_counts import state_counts
from hepato.common.tables import Job
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import ResourcesDep, SessionDep
from hepato.gateway.lookups import NOT_FOUND, BatchDep, public_url
from hepato.gateway.routes.jobs import job_out

router = APIRouter(prefix="/v1")


@router.get(
    "/batches/{batch_id}",
    response_model=schemas.BatchOut,
    responses=NOT_FOUND,
    summary="A batch's state, counts per job state and a page of its jobs",
)
def get_batch(
    batch_id: str,
    batch: BatchDep,
    request: Request,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> schemas.BatchOut:
    bid = batch.id
    size = page_size or res.settings.batch_page_size
    counts = state_counts(session, batch_id=bid)
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.batch_id == bid)
            .order_by(Job.created_at, Job.id)
            .offset((page - 1) * size)
            .limit(size)
        )
    )
    more = page * size < batch.total
    next_url = None
    if more:
        base = public_url(request, res, "get_batch", batch_id=batch_id)
        next_url = f"{base}?page={page + 1}&page_size={size}"
    audit.commit(
        session, caller, Action.read_batch, ObjectType.batch, bid, page=page, jobs=len(jobs)
    )
    return schemas.BatchOut(
        id=batch.id,
        state=batch_state(counts),
        model=batch.model,
        priority=batch.priority,
        total=batch.total,
        counts=counts,
        created_at=batch.created_at,
        page=page,
        page_size=size,
        jobs=[job_out(request, res, j) for j in jobs],
        next_page_url=next_url,
    )


@router.delete(
    "/batches/{batch_id}",
    response_model=schemas.Canceled,
    responses=NOT_FOUND,
    summary="Cancel the jobs of a batch that have not started",
)
def cancel_batch(
    batch_id: str,
    batch: BatchDep,
    request: Request,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
) -> schemas.Canceled:
    canceled = jobs.cancel(res.engine, batch_id=batch.id)
    audit.commit(session, caller, Action.cancel, ObjectType.batch, batch.id, canceled=canceled)
    return schemas.Canceled(
        canceled=canceled,
        status_url=public_url(request, res, "get_batch", batch_id=batch_id),
    )
