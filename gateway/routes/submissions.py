"""Submitting images: as a batch, as one job, or as one job the caller waits for.

``POST /v1/batches`` (alias ``/v1/assets``), ``/v1/jobs`` and ``/v1/predict`` (alias
``/v1/detect``), which answers with the result once the job has finished."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import AnyHttpUrl

from hepato.common import schemas
from hepato.common.audit import Caller
from hepato.common.constants import JobState, Priority
from hepato.common.ids import new_job_id
from hepato.common.manifest import ModelManifest
from hepato.common.results import TASK_RESULT
from hepato.gateway.auth import CallerDep
from hepato.gateway.deps import Resources, ResourcesDep
from hepato.gateway.finish_watch import FinishWatch, get_finish_watch
from hepato.gateway.idempotency import IdempotencyDep
from hepato.gateway.lookups import public_url
from hepato.gateway.routes.jobs import job_stages
from hepato.gateway.submit import Submission, Upload, submit

router = APIRouter(prefix="/v1")

FilesField = Annotated[list[UploadFile], File(description="Images (JPEG, PNG, TIFF, BMP, WebP)")]
FileField = Annotated[UploadFile, File(description="One image")]
ModelField = Annotated[str | None, Form(description="Model name; default from settings")]
PriorityField = Annotated[Priority, Form()]
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


@dataclass(frozen=True)
class SubmissionForm:
    """The form fields of a submission besides its files, for every route that takes
    them. FastAPI lists them in /openapi.json in this order, after the files."""

    model: ModelField = None
    priority: PriorityField = Priority.routine
    deadline_s: DeadlineField = None
    question: QuestionField = None
    callback_url: CallbackField = None


async def submission_form(
    model: ModelField = None,
    priority: PriorityField = Priority.routine,
    deadline_s: DeadlineField = None,
    question: QuestionField = None,
    callback_url: CallbackField = None,
) -> SubmissionForm:
    # A function rather than the class itself: FastAPI would call the class in its thread
    # pool, one thread hand-off each way per request.
    return SubmissionForm(model, priority, deadline_s, question, callback_url)


SubmissionFormDep = Annotated[SubmissionForm, Depends(submission_form)]


async def predict_form(
    model: ModelField = None,
    priority: PriorityField = Priority.urgent,
    question: QuestionField = None,
) -> SubmissionForm:
    """/v1/predict's narrower form: urgent by default; the caller waits, so it takes no
    deadline and no webhook."""
    return SubmissionForm(model=model, priority=priority, question=question)


def model_or_422(res: Resources, name: str | None) -> ModelManifest:
    """The named model's manifest (None: the default model); 422 listing the models."""
    name = name or res.settings.default_model
    if name not in res.models:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown model {name!r}; available: {', '.join(sorted(res.models))}",
        )
    return res.models[name]


def _model(res: Resources, form: SubmissionForm) -> ModelManifest:
    manifest = model_or_422(res, form.model)
    name = manifest.name
    if form.question is not None and manifest.task != "vqa":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"a question applies to vqa models only; {name!r} is a {manifest.task} model",
        )
    return manifest


async def _store(
    res: Resources,
    caller: Caller,
    files: list[UploadFile],
    model: ModelManifest,
    form: SubmissionForm,
    *,
    as_batch: bool,
    job_id: uuid.UUID | None = None,
) -> Submission:
    # submit() checks a callback_url (the tenant's signing secret, where it resolves to).
    # The files as the multipart parser spooled them (to disk past 1 MiB): submit() reads
    # and stores them in a worker thread, a chunk at a time, never the whole on the loop.
    uploads = [Upload(f.filename or "unnamed", f.file) for f in files]
    return await run_in_threadpool(
        submit,
        res,
        uploads,
        caller=caller,
        model=model,
        priority=form.priority,
        deadline_s=form.deadline_s,
        as_batch=as_batch,
        question=form.question,
        callback_url=str(form.callback_url) if form.callback_url else None,
        job_id=job_id,
        # Only /v1/predict names its job's id (it watches for it before it exists).
        wait=job_id is not None,
    )


def accepted_jobs(request: Request, res: Resources, sub: Submission) -> list[schemas.AcceptedJob]:
    return [
        schemas.AcceptedJob(
            job_id=job_id,
            filename=name,
            status_url=public_url(request, res, "get_job", job_id=str(job_id)),
        )
        for job_id, name in sub.jobs
    ]


def rejected_files(sub: Submission) -> list[schemas.RejectedFile]:
    return [
        schemas.RejectedFile(
            filename=r.filename, error=str(r.error), status_code=r.error.status_code
        )
        for r in sub.rejected
    ]


def batch_answer(
    request: Request, res: Resources, sub: Submission, model: str, priority: Priority, item: str
) -> schemas.BatchAccepted | JSONResponse:
    """A batch submission's answer (``item``: what the request's entries are called in
    the 422 when none was accepted)."""
    if sub.batch_id is None:
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content={
                "detail": f"no {item} of this request is an accepted image",
                "rejected": [r.model_dump() for r in rejected_files(sub)],
            },
        )
    return schemas.BatchAccepted(
        batch_id=sub.batch_id,
        status_url=public_url(request, res, "get_batch", batch_id=str(sub.batch_id)),
        model=model,
        priority=priority.value,
        accepted=len(sub.jobs),
        jobs=accepted_jobs(request, res, sub),
        rejected=rejected_files(sub),
    )


def job_answer(
    request: Request, res: Resources, sub: Submission, model: str, priority: Priority
) -> schemas.JobAccepted:
    """A one-job submission's answer; its file refused: the 4xx naming the problem."""
    if sub.rejected:
        bad = sub.rejected[0]
        raise HTTPException(bad.error.status_code, f"{bad.filename}: {bad.error}")
    job_id, filename = sub.jobs[0]
    return schemas.JobAccepted(
        job_id=job_id,
        filename=filename,
        status_url=public_url(request, res, "get_job", job_id=str(job_id)),
        model=model,
        priority=priority.value,
    )


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
    caller: CallerDep,
    idempotency: IdempotencyDep,
    files: FilesField,
    form: SubmissionFormDep,
) -> schemas.BatchAccepted | Response:
    async def run() -> schemas.BatchAccepted | JSONResponse:
        model = _model(res, form)
        sub = await _store(res, caller, files, model, form, as_batch=True)
        return batch_answer(request, res, sub, model.name, form.priority, "file")

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
    caller: Caller,
    file: UploadFile,
    form: SubmissionForm,
    job_id: uuid.UUID | None = None,
) -> schemas.JobAccepted:
    model = _model(res, form)
    sub = await _store(res, caller, [file], model, form, as_batch=False, job_id=job_id)
    return job_answer(request, res, sub, model.name, form.priority)


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
    caller: CallerDep,
    idempotency: IdempotencyDep,
    file: FileField,
    form: SubmissionFormDep,
) -> schemas.JobAccepted | Response:
    return await idempotency.run(
        status.HTTP_202_ACCEPTED, lambda: _submit_one(request, res, caller, file, form)
    )


# Past detect_timeout_s the answer is the 202 of POST /v1/jobs: the job goes on.
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": schemas.JobAccepted},
    **schemas.errors(400, 413, 415, 422, 429, 503),
}


@router.post(
    "/predict",
    response_model=schemas.PredictOut,
    responses=PREDICT_RESPONSES,
    summary="Run one image through a model and wait for the result",
)
@router.post(
    "/detect",
    response_model=schemas.PredictOut,
    responses=PREDICT_RESPONSES,
    summary="Alias of /v1/predict",
)
async def predict(
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    file: FileField,
    form: Annotated[SubmissionForm, Depends(predict_form)],
    watch: Annotated[FinishWatch, Depends(get_finish_watch)],
) -> schemas.PredictOut | JSONResponse:
    started = time.perf_counter()
    # Waiting costs no thread: the watch reads every waiting caller's job in one query
    # per round. It listens for the job before the job exists: no wake-up can be missed.
    job_id = new_job_id()
    async with watch.watching(job_id) as wait:
        accepted = await _submit_one(request, res, caller, file, form, job_id)
        finished = await wait(res.settings.detect_timeout_s)
    if finished is None:
        # Still queued or running: the job goes on; the caller polls the status URL.
        return JSONResponse(
            status_code=status.HTTP_202_ACCEPTED,
            headers={"Location": accepted.status_url},
            content=accepted.model_dump(mode="json"),
        )
    job = finished.job
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    if job.state != JobState.done:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"job {job.state}: {schemas.public_error(job.error) or 'no result'}",
        )
    latency_ms = (time.perf_counter() - started) * 1000.0
    return schemas.PredictOut(
        job_id=job_id,
        filename=accepted.filename,
        model=schemas.ModelRef(name=job.model, version=job.model_version),
        task=job.task,
        width=job.width,
        height=job.height,
        result=TASK_RESULT.validate_python(job.result),
        latency_ms=latency_ms,
        queue_wait_ms=job.queue_wait_ms,
        inference_ms=job.inference_ms,
        batch_size=job.batch_size,
        stages_ms=job_stages(job, latency_ms),
    )
