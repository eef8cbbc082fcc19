"""Direct uploads: ``POST /v1/uploads`` signs PUT URLs, the client puts its files on the
object store itself, then ``POST /v1/uploads/batches`` (or ``/v1/uploads/jobs``) commits
the keys as a batch (or as one job) and answers as ``POST /v1/batches`` (or
``/v1/jobs``) does.

A commit route of its own, rather than a JSON body on the multipart routes: those keep
their form contract (and their OpenAPI) unchanged, and the commit's body is a pydantic
model whose errors name the field. Checks and job creation are gateway.direct's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from hepato.common import direct_uploads, schemas
from hepato.common.audit import Caller
from hepato.common.ids import new_job_id
from hepato.common.images import MIME_TYPES, display_name
from hepato.common.upload_schemas import (
    CommitBatch,
    CommitJob,
    CommitOptions,
    StagedFile,
    UploadsRequest,
    UploadsSigned,
    UploadTicket,
)
from hepato.gateway.auth import CallerDep, TenantDep
from hepato.gateway.deps import Resources, ResourcesDep
from hepato.gateway.direct import Staged, commit
from hepato.gateway.idempotency import IdempotencyDep
from hepato.gateway.routes.submissions import batch_answer, job_answer, model_or_422
from hepato.gateway.submit import Submission

router = APIRouter(prefix="/v1/uploads", tags=["direct uploads"])

_IMAGE_TYPES = frozenset(MIME_TYPES.values())
_COMMIT_ERRORS: dict[int, str] = {
    400: "The body cannot be parsed as JSON",
    404: "An upload not found: never put, or another tenant's",
    409: "A key was committed before; nothing of this request was kept",
    410: "An upload's commit window (commit_by) has closed",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    mine: dict[int | str, dict[str, Any]] = {
        c: {"model": schemas.ErrorOut, "description": _COMMIT_ERRORS[c]}
        for c in codes
        if c in _COMMIT_ERRORS
    }
    return {**schemas.errors(*(c for c in codes if c not in _COMMIT_ERRORS)), **mine}


def _too_many(res: Resources, count: int) -> None:
    limit = res.settings.max_files_per_request
    if count > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{count} files, more than {limit} per request (HEPATO_MAX_FILES_PER_REQUEST); "
            "send the rest in another request",
        )


@router.post(
    "",
    response_model=UploadsSigned,
    responses=_errors(400, 413, 415, 422),
    summary="Presigned PUT URLs for files the client uploads to the object store itself",
)
def sign_uploads(body: UploadsRequest, res: ResourcesDep, tenant: TenantDep) -> UploadsSigned:
    settings = res.settings
    specs = body.specs()
    _too_many(res, len(specs))
    for n, spec in enumerate(specs):
        if spec.size is not None and spec.size > settings.max_file_bytes:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"files[{n}]: {spec.size} bytes is larger than the limit of "
                f"{settings.max_file_bytes} bytes",
            )
        declared = (spec.content_type or "").split(";")[0].strip().lower()
        if spec.content_type is not None and declared not in _IMAGE_TYPES:
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"files[{n}]: content_type {spec.content_type!r} is not one of "
                + ", ".join(sorted(_IMAGE_TYPES)),
            )
    expiry = settings.upload_url_expiry_s
    now = datetime.now(UTC)
    # Signing is local (no request to the store): a thousand URLs cost milliseconds.
    # Each key names the id its job will have (common.ids: it says when it was made).
    keys = [direct_uploads.new_key(tenant, new_job_id(), now) for _ in specs]
    expires_at = now + timedelta(seconds=expiry)
    return UploadsSigned(
        uploads=[
            UploadTicket(
                key=k.key, url=res.store.presigned_put_url(k.key, expiry), expires_at=expires_at
            )
            for k in keys
        ],
        expires_in_s=expiry,
        commit_by=keys[0].commit_by(expiry),
        max_file_bytes=settings.max_file_bytes,
    )


def _staged(files: list[StagedFile]) -> list[Staged]:
    """Each key parsed; a key that is not a direct upload's, or named twice, refuses the
    whole request (422) before anything is read."""
    out, seen = [], set()
    for n, f in enumerate(files):
        key = direct_uploads.parse_key(f.key)
        if key is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"uploads[{n}]: {f.key!r} is not a key of POST /v1/uploads",
            )
        if key.key in seen:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"uploads[{n}]: {f.key!r} is named twice"
            )
        seen.add(key.key)
        out.append(Staged(key, display_name(f.filename or key.key)))
    return out


async def _commit(
    res: Resources, caller: Caller, files: list[StagedFile], form: CommitOptions, *, as_batch: bool
) -> tuple[Submission, str]:
    _too_many(res, len(files))
    items = _staged(files)
    model = model_or_422(res, form.model)
    if form.question is not None and model.task != "vqa":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"a question applies to vqa models only; {model.name!r} is a {model.task} model",
        )
    sub = await run_in_threadpool(
        commit,
        res,
        items,
        caller=caller,
        model=model,
        priority=form.priority,
        deadline_s=form.deadline_s,
        as_batch=as_batch,
        question=form.question,
        callback_url=str(form.callback_url) if form.callback_url else None,
    )
    return sub, model.name


@router.post(
    "/batches",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.BatchAccepted,
    responses=_errors(400, 409, 413, 422, 429, 503),
    summary="Commit uploaded files as a batch (answers as POST /v1/batches)",
)
async def commit_batch(
    body: CommitBatch,
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    idempotency: IdempotencyDep,
) -> schemas.BatchAccepted | Response:
    async def run() -> schemas.BatchAccepted | JSONResponse:
        sub, model = await _commit(res, caller, body.uploads, body, as_batch=True)
        return batch_answer(request, res, sub, model, body.priority, "upload")

    return await idempotency.run(status.HTTP_202_ACCEPTED, run)


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.JobAccepted,
    responses=_errors(400, 404, 409, 410, 413, 415, 422, 429, 503),
    summary="Commit one uploaded file as a job (answers as POST /v1/jobs)",
)
async def commit_job(
    body: CommitJob,
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    idempotency: IdempotencyDep,
) -> schemas.JobAccepted | Response:
    async def run() -> schemas.JobAccepted:
        sub, model = await _commit(res, caller, [body.upload], body, as_batch=False)
        return job_answer(request, res, sub, model, body.priority)

    return await idempotency.run(status.HTTP_202_ACCEPTED, run)
