"""Where a job's time went: the steps of its last run, in order, in milliseconds.

The gateway and the worker each time the steps they run (``jobs.stages`` holds them); the
waits between processes come from the job's timeline. A step of a microbatch (decode,
inference, ...) is the microbatch's, shared by its jobs. Clocks of different machines
are never subtracted: queue is the database's, the worker's steps are the worker's."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

# Measured by the gateway before the job's row exists: inspect the upload, check room,
# store the image. A lone file's PUT runs alongside its insert (gateway.submit): it is
# started here, and what is left of it shows in ``queue``.
UPLOAD = "upload"
# Measured by the worker, per microbatch.
CLAIM = "claim"
DOWNLOAD = "download"
DECODE = "decode"
PREPROCESS = "preprocess"
TO_MODEL = "to_model"  # prepared, waiting for the model stage to be free
TO_WRITE = "to_write"  # inferred, waiting for the write stage to be free
POSTPROCESS = "postprocess"
# A head start (worker.head_start): the part of the model call that ran before the job's
# microbatch reached the model stage, while the job was stored, committed, queued and
# claimed; the rest of the call is the microbatch's ``to_model`` wait for it. So with a
# head start ``inference`` overlaps other steps in full, and neither is added (``total``).
HEAD_START = "head_start"
# From the job's own columns.
# Accepted → claimed (queue_wait_ms, the database's clock): from the start of the
# inserting transaction, so the commit, the push and the pop are in it.
QUEUE = "queue"
INFERENCE = "inference"  # the model call of its microbatch (inference_ms)
WRITE = "write"  # inferred → committed, less the waits and post-processing measured
# /v1/predict only: the rest of the latency its caller saw (request parsing, the wake-up
# after the commit and the answer it carries, the response).
OTHER = "other"

ORDER = (
    UPLOAD,
    QUEUE,
    CLAIM,
    HEAD_START,
    DOWNLOAD,
    DECODE,
    PREPROCESS,
    TO_MODEL,
    INFERENCE,
    TO_WRITE,
    POSTPROCESS,
    WRITE,
    OTHER,
)


def breakdown(
    recorded: Mapping[str, Any] | None,
    *,
    queue_ms: float | None,
    inference_ms: float | None,
    inferred_at: datetime | None,
    finished_at: datetime | None,
    latency_ms: float | None = None,
) -> dict[str, float]:
    """The job's steps in order, ms (rounded to 0.1); a step not reached is left out.
    With ``latency_ms`` (the caller's whole wait), what no step accounts for is ``other``."""
    found = {k: float(v) for k, v in (recorded or {}).items() if isinstance(v, int | float)}
    if queue_ms is not None:
        found[QUEUE] = queue_ms
    if inference_ms is not None:
        found[INFERENCE] = inference_ms
    if inferred_at is not None and finished_at is not None:
        # inferred_at is the worker's clock and finished_at the database's: on one host
        # they agree; across hosts a skew shows here, and only here.
        span = (finished_at - inferred_at).total_seconds() * 1000.0
        found[WRITE] = max(0.0, span - found.get(TO_WRITE, 0.0) - found.get(POSTPROCESS, 0.0))
    if latency_ms is not None:
        found[OTHER] = max(0.0, latency_ms - total({k: v for k, v in found.items() if k != OTHER}))
    return {k: round(found[k], 1) for k in ORDER if k in found}


def total(steps: Mapping[str, float]) -> float:
    """The time ``steps`` account for, ms: their sum less what overlapped. A head start's
    model call ran during queue, claim and to_model, so neither it nor inference is added."""
    overlapped = {HEAD_START, INFERENCE} if HEAD_START in steps else set()
    return sum(v for k, v in steps.items() if k not in overlapped)
