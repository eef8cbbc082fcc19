"""Cancelling what has not started."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status

from hepato.common import jobs, schemas
from hepato.common.constants import JobState
from hepato.gateway.auth import TenantDep
from hepato.gateway.deps import ResourcesDep, SessionDep
from hepato.gateway.lookups import batch_or_404, job_or_404, public_url

router = APIRouter(prefix="/v1")


@router.delete(
    "/jobs/{job_id}",
    response_model=schemas.Canceled,
    responses={404: {"model": schemas.ErrorOut}, 409: {"model": schemas.ErrorOut}},
    summary="Cancel a job that has not started",
)
def cancel_job(
    job_id: str, request: Request, res: ResourcesDep, session: SessionDep, tenant: TenantDep
) -> schemas.Canceled:
    job = job_or_404(session, job_id, tenant)
    jid = job.id
    if jobs.cancel(res.engine, job_id=jid) == 0:
        session.refresh(job)
        if job.state != JobState.canceled:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"job is {job.state}: only pending jobs can be canceled"
            )
    url = public_url(request, res, "get_job", job_id=job_id)
    return schemas.Canceled(canceled=1, status_url=url)


@router.delete(
    "/batches/{batch_id}",
    response_model=schemas.Canceled,
    responses={404: {"model": schemas.ErrorOut}},
    summary="Cancel the jobs of a batch that have not started",
)
def cancel_batch(
    batch_id: str, request: Request, res: ResourcesDep, session: SessionDep, tenant: TenantDep
) -> schemas.Canceled:
    batch = batch_or_404(session, batch_id, tenant)
    return schemas.Canceled(
        canceled=jobs.cancel(res.engine, batch_id=batch.id),
        status_url=public_url(request, res, "get_batch", batch_id=batch_id),
    )
