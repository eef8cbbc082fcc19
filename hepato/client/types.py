"""What the Python client raises and the events it yields."""

from __future__ import annotations

import email.utils
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from hepato.common.constants import BatchState, JobState
from hepato.common.schemas import BatchAccepted
from hepato.common.slide_schemas import SlideOut

# What POST /v1/batches answers: the batch, its jobs and the files it refused by name.
BatchRef = BatchAccepted
# The formats of GET /v1/batches/{id}/export.
Formats = Literal["geojson", "coco", "csv"]
# The formats of GET /v1/slides/{id}/export.
SlideFormats = Literal["geojson", "csv"]
# wait_slide's callback: the slide each time it changes (its tiles, its state).
OnSlideProgress = Callable[[SlideOut], object]


class HepatoClientError(Exception):
    """Every error this client raises."""


class HepatoConnectionError(HepatoClientError):
    """The gateway could not be reached (after the retries)."""


class HepatoAPIError(HepatoClientError):
    """The gateway answered with an error status (after the retries for 429 and 503)."""

    def __init__(self, status_code: int, detail: Any, *, submitted: Sequence[BatchAccepted] = ()):
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        # submit(): the batches the requests before the failing one created.
        self.submitted = list(submitted)

    @classmethod
    def from_response(cls, response: httpx.Response) -> HepatoAPIError:
        try:
            body = response.json()
            detail = body.get("detail", body) if isinstance(body, dict) else body
        except ValueError:
            detail = response.text or response.reason_phrase
        return cls(response.status_code, detail)


class JobEvent(BaseModel):
    """One state change of a job (``event: job`` on an events stream)."""

    event_id: str | None = None
    job_id: uuid.UUID
    batch_id: uuid.UUID | None = None
    state: JobState
    error: str | None = None
    at: datetime


class BatchEvent(BaseModel):
    """A batch's state and counts: the last event of a batch stream, and what the polling
    fallback of ``wait`` reports whenever the counts change. ``event_id``: the stream's
    last id (SSE keeps it for an event that names none); None when polled."""

    event_id: str | None = None
    batch_id: uuid.UUID
    state: BatchState
    counts: dict[str, int]


Event = JobEvent | BatchEvent
OnEvent = Callable[[Event], object]


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
