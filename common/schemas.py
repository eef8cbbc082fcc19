"""Response bodies of the public API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from hepato.common.constants import BatchState, JobState
from hepato.common.results import TaskResult


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
    worker_id: str | None
    result: TaskResult | None = Field(description="Present when state is done")
    error: str | None
    status_url: str
    image_url: str


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
