"""Response bodies of the public API."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from hepato.common.constants import BatchState, JobState
from hepato.common.results import TaskResult

# What marks an error text as naming the inside of the deployment: a URL, an IPv4 or
# bracketed IPv6 address, host=/port= (urllib3, libpq), or a host:port pair.
_INTERNAL = re.compile(
    r"[a-z][a-z0-9+.-]*://|\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-f:]+\]|\b(?:host|port)\s*=|"
    r"\b[a-z0-9][a-z0-9.-]*:\d{2,5}\b",
    re.IGNORECASE,
)
INTERNAL_ERROR = "an internal service failed while processing this job (details in the server logs)"


def public_error(error: str | None) -> str | None:
    """``error`` as a tenant may see it: as is, or generic if it names internal hosts."""
    if error is None or not _INTERNAL.search(error):
        return error
    return INTERNAL_ERROR


class ModelRef(BaseModel):
    name: str
    version: str | None = Field(description="Version that produced the result; null before")


class ModelOut(BaseModel):
    name: str
    version: str
    task: str
    backend: str
    description: str
    labels: list[str]
    input_size: int
    max_batch_size: int
    default: bool
    workers: int | None = Field(
        None,
        description="Workers alive now that serve this model (by their heartbeat); 0: its "
        "jobs wait until one starts; null: unknown (Redis unreachable)",
    )


class JobTimeline(BaseModel):
    """When the job reached each step of its last run; null until it has. queued,
    claimed and written are the database's clock, fetched and inferred the worker's."""

    queued: datetime | None = Field(description="Accepted by the gateway (created_at)")
    claimed: datetime | None = Field(
        description="Claimed by the worker that ran it last (started_at); a retry moves it"
    )
    fetched: datetime | None = Field(description="Its image downloaded from the object store")
    inferred: datetime | None = Field(description="The model call of its batch returned")
    written: datetime | None = Field(
        description="Its result committed, or it failed, expired or was canceled (finished_at)"
    )


class JobOut(BaseModel):
    id: uuid.UUID
    batch_id: uuid.UUID | None
    filename: str
    state: JobState
    model: ModelRef
    task: str = Field(description="detect, classify, zero-shot or vqa: the shape of result")
    priority: str
    attempts: int
    max_attempts: int
    width: int
    height: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None
    queue_wait_ms: float | None = Field(description="Submission to the claim that ran it, ms")
    inference_ms: float | None = Field(description="Model call of its batch, ms")
    batch_size: int | None = Field(description="Images in the model call this job ran in")
    timeline: JobTimeline = Field(
        description="When it was queued, claimed, fetched, inferred and written"
    )
    stages_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Where its last run's time went, ms, in order (a step not reached is "
        "absent): upload (the gateway storing the image; a lone image's store ends during "
        "queue), queue (accepted to claimed), claim, head_start (of the model call, what ran "
        "before the job reached the model stage: already in inference), "
        "download, decode, preprocess, to_model (waiting for the model), inference, to_write, "
        "postprocess, write (to the commit); steps of a microbatch are the microbatch's",
    )
    # No worker_id: which host and process ran a job is the operator's, not the tenant's.
    result: TaskResult | None = Field(description="Present when state is done")
    error: str | None = Field(
        description="Why it failed or was retried; an error naming internal hosts or URLs "
        "is replaced by a generic one (the operator's logs and database keep the detail)"
    )
    status_url: str
    image_url: str

    @field_validator("error")
    @classmethod
    def _public(cls, error: str | None) -> str | None:
        return public_error(error)


class AcceptedJob(BaseModel):
    job_id: uuid.UUID
    filename: str
    status_url: str


class RejectedFile(BaseModel):
    filename: str
    error: str
    status_code: int


class BatchAccepted(BaseModel):
    batch_id: uuid.UUID
    status_url: str
    model: str
    priority: str
    accepted: int
    jobs: list[AcceptedJob]
    rejected: list[RejectedFile]


class JobAccepted(AcceptedJob):
    model: str
    priority: str


class BatchOut(BaseModel):
    id: uuid.UUID
    state: BatchState
    model: str
    priority: str
    total: int
    counts: dict[str, int]
    created_at: datetime
    page: int
    page_size: int
    jobs: list[JobOut]
    next_page_url: str | None


class PredictOut(BaseModel):
    job_id: uuid.UUID
    filename: str
    model: ModelRef
    task: str
    width: int
    height: int
    result: TaskResult
    latency_ms: float = Field(description="Request received to result read, ms")
    queue_wait_ms: float | None
    inference_ms: float | None
    batch_size: int | None
    stages_ms: dict[str, float] = Field(
        default_factory=dict,
        description="As in GET /v1/jobs/{id}, and other: the rest of latency_ms (request "
        "parsing, the wake-up after the commit, reading the result)",
    )


class ErrorOut(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Unprocessable(BaseModel):
    """A 422 is either the gateway's own message or FastAPI's list of invalid fields."""

    detail: str | list[ValidationIssue]
    rejected: list[RejectedFile] | None = Field(
        None, description="POST /v1/batches: every file, refused by name, when none was accepted"
    )


_ERRORS: dict[int, tuple[type[BaseModel], str]] = {
    400: (ErrorOut, "The multipart body cannot be parsed"),
    413: (
        ErrorOut,
        "The request, its file count or field count, a file, or an image's pixel count is "
        "over its limit",
    ),
    415: (ErrorOut, "The file is not JPEG, PNG, TIFF, BMP or WebP (judged from its bytes)"),
    422: (Unprocessable, "A corrupt or truncated file, an unknown model, or an invalid field"),
    429: (ErrorOut, "The model's queue is full; nothing was kept; retry after Retry-After"),
    503: (ErrorOut, "Postgres, Redis or the object store is down; retry after Retry-After"),
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses."""
    return {c: {"model": _ERRORS[c][0], "description": _ERRORS[c][1]} for c in codes}


class Canceled(BaseModel):
    canceled: int = Field(description="Jobs that were pending and are now canceled")
    status_url: str


class PresignedImage(BaseModel):
    url: str = Field(description="GET it without a key until it expires; then it is refused")
    expires_in_s: int = Field(description="Lifetime of the link from its making, s")
    expires_at: datetime
