"""One job: its state and result, its image, and cancelling it before it starts.

``GET /v1/jobs/{id}``, ``.../image``, ``.../image_url`` and ``DELETE /v1/jobs/{id}``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import Response

from hepato.common import audit, jobs, schemas, stages
from hepato.common.audit import Action, ObjectType
from hepato.common.constants import JobState
from hepato.common.results import TASK_RESULT
from hepato.common.tables import Job
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import Resources, ResourcesDep, SessionDep
from hepato.gateway.lookups import NOT_FOUND, JobDep, public_url

router = APIRouter(prefix="/v1")


def job_stages(job: Job, latency_ms: float | None = None) -> dict[str, float]:
    return stages.breakdown(
        job.stages,
        queue_ms=job.queue_wait_ms,
        inference_ms=job.inference_ms,
        inferred_at=job.inferred_at,
        finished_at=job.finished_at,
        latency_ms=latency_ms,
    )


def job_out(request: Request, res: Resources, job: Job) -> schemas.JobOut:
    jid = str(job.id)
    return schemas.JobOut(
        id=job.id,
        batch_id=job.batch_id,
        filename=job.filename,
        state=JobState(job.state),
        model=schemas.ModelRef(name=job.model, version=job.model_version),
        task=job.task,
        priority=job.priority,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        width=job.width,
        height=job.height,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        deadline_at=job.deadline_at,
        queue_wait_ms=job.queue_wait_ms,
        inference_ms=job.inference_ms,
        batch_size=job.batch_size,
        timeline=schemas.JobTimeline(
            queued=job.created_at,
            claimed=job.started_at,
            fetched=job.fetched_at,
            inferred=job.inferred_at,
            written=job.finished_at,
        ),
        stages_ms=job_stages(job),
        result=TASK_RESULT.validate_python(job.result) if job.result is not None else None,
        error=job.error,
        status_url=public_url(request, res, "get_job", job_id=jid),
        image_url=public_url(request, res, "get_job_image", job_id=jid),
    )


@router.get(
    "/jobs/{job_id}",
    response_model=schemas.JobOut,
    responses=NOT_FOUND,
    summary="A job's state and, when done, its typed result",
)
def get_job(
    job: JobDep, request: Request, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> schemas.JobOut:
    out = job_out(request, res, job)
    audit.commit(session, caller, Action.read_job, ObjectType.job, job.id)
    return out


@router.get(
    "/jobs/{job_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, **NOT_FOUND},
    summary="The uploaded image of a job",
)
def get_job_image(
    job: JobDep, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> Response:
    data = res.store.get(job.object_key)
    audit.commit(session, caller, Action.read_image, ObjectType.job, job.id)
    return Response(content=data, media_type=f"image/{job.image_format}")


@router.get(
    "/jobs/{job_id}/image_url",
    response_model=schemas.PresignedImage,
    responses=NOT_FOUND,
    summary="A presigned link to the uploaded image, valid for HEPATO_PRESIGN_EXPIRY_S",
)
def get_job_image_url(
    job: JobDep, res: ResourcesDep, session: SessionDep, caller: CallerDep
) -> schemas.PresignedImage:
    expiry_s = res.settings.presign_expiry_s
    expires_at = datetime.now(UTC) + timedelta(seconds=expiry_s)
    url = res.store.presigned_url(job.object_key, expiry_s)
    audit.commit(
        session, caller, Action.read_image_url, ObjectType.job, job.id, expires_in_s=expiry_s
    )
    return schemas.PresignedImage(url=url, expires_in_s=expiry_s, expires_at=expires_at)


@router.delete(
    "/jobs/{job_id}",
    response_model=schemas.Canceled,
    responses={**NOT_FOUND, 409: {"model": schemas.ErrorOut}},
    summary="Cancel a job that has not started",
)
def cancel_job(
    job_id: str,
    job: JobDep,
    request: Request,
    res: ResourcesDep,
    session: SessionDep,
    caller: CallerDep,
) -> schemas.Canceled:
    canceled = jobs.cancel(res.engine, job_id=job.id)
    if canceled == 0:
        session.refresh(job)
        if job.state != JobState.canceled:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"job is {job.state}: only pending jobs can be canceled"
            )
    # The cancel committed on its own connection (common.jobs); this row follows it.
    audit.commit(session, caller, Action.cancel, ObjectType.job, job.id, canceled=canceled)
    url = public_url(request, res, "get_job", job_id=job_id)
    return schemas.Canceled(canceled=1, status_url=url)
