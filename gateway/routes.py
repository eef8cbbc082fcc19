"""The public API (v1)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import AnyHttpUrl
from sqlalchemy import func, select

from hepato.common import schemas
from hepato.common.constants import (
    TERMINAL_STATES,
    JobState,
    Priority,
    batch_state,
    job_done_channel,
)
from hepato.common.manifest import ModelManifest
from hepato.common.results import TASK_RESULT
from hepato.common.tables import Batch, Job
from hepato.gateway.auth import TenantDep
from hepato.gateway.deps import Resources, ResourcesDep, SessionDep
from hepato.gateway.idempotency import IdempotencyDep
from hepato.gateway.lookups import batch_or_404, job_or_404, public_url
from hepato.gateway.submit import Submission, Upload, submit

router = APIRouter(prefix="/v1")

T = TypeVar("T", Job, Batch)

FilesField = Annotated[list[UploadFile], File(description="Images (JPEG, PNG, TIFF, BMP, WebP)")]
FileField = Annotated[UploadFile, File(description="One image")]
ModelField = Annotated[str | None, Form(description="Model name; default from settings")]
QuestionField = Annotated[
    str | None,
    Form(
        min_length=1,
        max_length=2000,
        description="For vqa models: the question to ask of each image; default the model's",
    ),
]
CallbackField = Annotated[
    AnyHttpUrl | None,
    Form(
        description="http(s) URL to POST a signed webhook (Standard Webhooks) to when the "
        "batch, or a job without a batch, is finished"
    ),
]
# A year bounds the deadline: past it the timestamp arithmetic overflows (a fuzzer found).
MAX_DEADLINE_S = 365 * 24 * 3600
DeadlineField = Annotated[
    float | None,
    Form(gt=0, le=MAX_DEADLINE_S, description="Run within this many seconds (≤ a year) or expire"),
]


def _model(res: Resources, model: str | None, question: str | None = None) -> ModelManifest:
    name = model or res.settings.default_model
    if name not in res.models:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown model {name!r}; available: {', '.join(sorted(res.models))}",
        )
    manifest = res.models[name]
    if question is not None and manifest.task != "vqa":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"a question applies to vqa models only; {name!r} is a {manifest.task} model",
        )
    return manifest


async def _store(
    res: Resources,
    tenant: str,
    files: list[UploadFile],
    model: ModelManifest,
    priority: Priority,
    deadline_s: float | None,
    question: str | None,
    *,
    as_batch: bool,
    callback_url: AnyHttpUrl | None = None,
) -> Submission:
    if callback_url is not None and not res.settings.webhook_secret:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "callback_url: webhooks are not configured on this server (HEPATO_WEBHOOK_SECRET)",
        )
    # The files as the multipart parser spooled them (to disk past 1 MiB): submit() reads
    # and stores them in a worker thread, a chunk at a time, never the whole on the loop.
    uploads = [Upload(f.filename or "unnamed", f.file) for f in files]
    return await run_in_threadpool(
        submit,
        res,
        uploads,
        tenant=tenant,
        model=model,
        priority=priority,
        deadline_s=deadline_s,
        as_batch=as_batch,
        question=question,
        callback_url=str(callback_url) if callback_url else None,
    )


def _accepted(request: Request, res: Resources, sub: Submission) -> list[schemas.AcceptedJob]:
    return [
        schemas.AcceptedJob(
            job_id=job_id,
            filename=name,
            status_url=public_url(request, res, "get_job", job_id=str(job_id)),
        )
        for job_id, name in sub.jobs
    ]


def _rejected(sub: Submission) -> list[schemas.RejectedFile]:
    return [
        schemas.RejectedFile(
            filename=r.filename, error=str(r.error), status_code=r.error.status_code
        )
        for r in sub.rejected
    ]


@router.post(
    "/batches",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.BatchAccepted,
    responses=schemas.errors(400, 413, 422, 429, 503),
    summary="Submit a batch of images",
)
async def submit_batch(
    request: Request,
    res: ResourcesDep,
    tenant: TenantDep,
    idempotency: IdempotencyDep,
    files: FilesField,
    model: ModelField = None,
    priority: Annotated[Priority, Form()] = Priority.routine,
    deadline_s: DeadlineField = None,
    question: QuestionField = None,
    callback_url: CallbackField = None,
) -> schemas.BatchAccepted | Response:
    async def run() -> schemas.BatchAccepted | JSONResponse:
        name = _model(res, model, question)
        sub = await _store(
            res,
            tenant,
            files,
            name,
            priority,
            deadline_s,
            question,
            as_batch=True,
            callback_url=callback_url,
        )
        if sub.batch_id is None:
            return JSONResponse(
                status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
                content={
                    "detail": "no file of this request is an accepted image",
                    "rejected": [r.model_dump() for r in _rejected(sub)],
                },
            )
        return schemas.BatchAccepted(
            batch_id=sub.batch_id,
            status_url=public_url(request, res, "get_batch", batch_id=str(sub.batch_id)),
            model=name.name,
            priority=priority.value,
            accepted=len(sub.jobs),
            jobs=_accepted(request, res, sub),
            rejected=_rejected(sub),
        )

    return await idempotency.run(status.HTTP_202_ACCEPTED, run)


# The seed's documented upload call, kept verbatim as an alias.
router.add_api_route(
    "/assets",
    submit_batch,
    methods=["POST"],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.BatchAccepted,
    responses=schemas.errors(400, 413, 422, 429, 503),
    summary="Submit a batch of images (alias of POST /v1/batches)",
)


async def _submit_one(
    request: Request,
    res: Resources,
    tenant: str,
    file: UploadFile,
    model: str | None,
    priority: Priority,
    deadline_s: float | None,
    question: str | None,
    callback_url: AnyHttpUrl | None = None,
) -> schemas.JobAccepted:
    name = _model(res, model, question)
    sub = await _store(
        res,
        tenant,
        [file],
        name,
        priority,
        deadline_s,
        question,
        as_batch=False,
        callback_url=callback_url,
    )
    if sub.rejected:
        bad = sub.rejected[0]
        raise HTTPException(bad.error.status_code, f"{bad.filename}: {bad.error}")
    job_id, filename = sub.jobs[0]
    return schemas.JobAccepted(
        job_id=job_id,
        filename=filename,
        status_url=public_url(request, res, "get_job", job_id=str(job_id)),
        model=name.name,
        priority=priority.value,
    )


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.JobAccepted,
    responses=schemas.errors(400, 413, 415, 422, 429, 503),
    summary="Submit one image",
)
async def submit_job(
    request: Request,
    res: ResourcesDep,
    tenant: TenantDep,
    idempotency: IdempotencyDep,
    file: FileField,
    model: ModelField = None,
    priority: Annotated[Priority, Form()] = Priority.routine,
    deadline_s: DeadlineField = None,
    question: QuestionField = None,
    callback_url: CallbackField = None,
) -> schemas.JobAccepted | Response:
    return await idempotency.run(
        status.HTTP_202_ACCEPTED,
        lambda: _submit_one(
            request, res, tenant, file, model, priority, deadline_s, question, callback_url
        ),
    )


@router.post(
    "/predict",
    response_model=schemas.PredictOut,
    responses={
        202: {"model": schemas.JobAccepted},
        **schemas.errors(400, 413, 415, 422, 429, 503),
    },
    summary="Run one image through a model and wait for the result",
)
@router.post(
    "/detect",
    response_model=schemas.PredictOut,
    responses={
        202: {"model": schemas.JobAccepted},
        **schemas.errors(400, 413, 415, 422, 429, 503),
    },
    summary="Alias of /v1/predict",
)
async def predict(
    request: Request,
    res: ResourcesDep,
    tenant: TenantDep,
    file: FileField,
    model: ModelField = None,
    priority: Annotated[Priority, Form()] = Priority.urgent,
    question: QuestionField = None,
) -> schemas.PredictOut | JSONResponse:
    started = time.perf_counter()
    accepted = await _submit_one(request, res, tenant, file, model, priority, None, question)
    job_id = accepted.job_id
    state = await run_in_threadpool(_wait_finished, res, job_id, res.settings.detect_timeout_s)
    if state not in TERMINAL_STATES:
        # Still queued or running: the job goes on; the caller polls the status URL.
        return JSONResponse(
            status_code=status.HTTP_202_ACCEPTED,
            headers={"Location": accepted.status_url},
            content=accepted.model_dump(mode="json"),
        )
    # A route that awaits runs on the event loop: the read goes to a worker thread.
    job = await run_in_threadpool(_finished_job, res, job_id)
    if job.state != JobState.done:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"job {job.state}: {job.error or 'no result'}",
        )
    return schemas.PredictOut(
        job_id=job_id,
        filename=accepted.filename,
        model=schemas.ModelRef(name=job.model, version=job.model_version),
        task=job.task,
        width=job.width,
        height=job.height,
        result=TASK_RESULT.validate_python(job.result),
        latency_ms=(time.perf_counter() - started) * 1000.0,
        queue_wait_ms=job.queue_wait_ms,
        inference_ms=job.inference_ms,
        batch_size=job.batch_size,
    )


def _finished_job(res: Resources, job_id: uuid.UUID) -> Job:
    with res.sessions() as session:
        return session.get_one(Job, job_id)


def _wait_finished(res: Resources, job_id: uuid.UUID, timeout_s: float) -> str:
    """Wait for a worker's finished-notice, re-reading Postgres at least every second
    so a lost notice (Redis restart) costs latency, not the answer."""
    deadline = time.monotonic() + timeout_s
    pubsub = res.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(job_done_channel(str(job_id)))
        while True:
            with res.sessions() as session:
                state = session.scalar(select(Job.state).where(Job.id == job_id))
            remaining = deadline - time.monotonic()
            if state in TERMINAL_STATES or remaining <= 0 or state is None:
                return state or JobState.failed
            pubsub.get_message(timeout=min(1.0, remaining))
    finally:
        pubsub.close()


def _job_out(request: Request, res: Resources, job: Job) -> schemas.JobOut:
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
        worker_id=job.worker_id,
        result=TASK_RESULT.validate_python(job.result) if job.result is not None else None,
        error=job.error,
        status_url=public_url(request, res, "get_job", job_id=jid),
        image_url=public_url(request, res, "get_job_image", job_id=jid),
    )


@router.get("/models", response_model=list[schemas.ModelOut], summary="Models jobs can name")
def list_models(res: ResourcesDep) -> list[schemas.ModelOut]:
    return [
        schemas.ModelOut(
            name=m.name,
            version=m.version,
            task=m.task,
            backend=m.backend,
            description=m.description,
            labels=m.labels,
            input_size=m.input_size,
            max_batch_size=m.max_batch_size,
            default=m.name == res.settings.default_model,
        )
        for m in sorted(res.models.values(), key=lambda m: m.name)
    ]


@router.get(
    "/jobs/{job_id}",
    response_model=schemas.JobOut,
    responses={404: {"model": schemas.ErrorOut}},
    summary="A job's state and, when done, its typed result",
)
def get_job(
    job_id: str, request: Request, res: ResourcesDep, session: SessionDep, tenant: TenantDep
) -> schemas.JobOut:
    job = job_or_404(session, job_id, tenant)
    return _job_out(request, res, job)


@router.get(
    "/jobs/{job_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, 404: {"model": schemas.ErrorOut}},
    summary="The uploaded image of a job",
)
def get_job_image(
    job_id: str, res: ResourcesDep, session: SessionDep, tenant: TenantDep
) -> Response:
    job = job_or_404(session, job_id, tenant)
    data = res.store.get(job.object_key)
    return Response(content=data, media_type=f"image/{job.image_format}")


@router.get(
    "/jobs/{job_id}/image_url",
    response_model=schemas.PresignedImage,
    responses={404: {"model": schemas.ErrorOut}},
    summary="A presigned link to the uploaded image, valid for HEPATO_PRESIGN_EXPIRY_S",
)
def get_job_image_url(
    job_id: str, res: ResourcesDep, session: SessionDep, tenant: TenantDep
) -> schemas.PresignedImage:
    job = job_or_404(session, job_id, tenant)
    expiry_s = res.settings.presign_expiry_s
    expires_at = datetime.now(UTC) + timedelta(seconds=expiry_s)
    return schemas.PresignedImage(
        url=res.store.presigned_url(job.object_key, expiry_s),
        expires_in_s=expiry_s,
        expires_at=expires_at,
    )


@router.get(
    "/batches/{batch_id}",
    response_model=schemas.BatchOut,
    responses={404: {"model": schemas.ErrorOut}},
    summary="A batch's state, counts per job state and a page of its jobs",
)
def get_batch(
    batch_id: str,
    request: Request,
    res: ResourcesDep,
    session: SessionDep,
    tenant: TenantDep,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> schemas.BatchOut:
    batch = batch_or_404(session, batch_id, tenant)
    bid = batch.id
    size = page_size or res.settings.batch_page_size
    counts = {s.value: 0 for s in JobState}
    for state, n in session.execute(
        select(Job.state, func.count()).where(Job.batch_id == bid).group_by(Job.state)
    ):
        counts[state] = n
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
        jobs=[_job_out(request, res, j) for j in jobs],
        next_page_url=next_url,
    )
