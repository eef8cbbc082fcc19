"""The model stage's one call: a microbatch through the model, time-bounded, with a poison
input isolated to its own job."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

import numpy as np

from common.jobs import ClaimedJob, JobResult
from worker.backends.base import AsksQuestions, Model

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelTimeout(Exception):
    pass


def infer(
    model: Model, ready: list[ClaimedJob], images: list[np.ndarray], timeout_s: float
) -> tuple[list[JobResult], dict[uuid.UUID, str]]:
    """Results, and the jobs to retry. A model call that raises on a microbatch is run
    again one image at a time, so that one poison input costs only its own job an
    attempt; a call that overruns ``timeout_s`` retries the whole batch."""
    if not ready:
        return [], {}
    try:
        return predict(model, ready, images, timeout_s), {}
    except ModelTimeout as exc:
        log.error("%s; %d jobs go back to the queue", exc, len(ready))
        return [], {job.id: str(exc) for job in ready}
    except Exception as exc:
        if len(ready) == 1:
            return [], {ready[0].id: f"the model failed on this image: {exc!r}"}
        log.warning("model call on %d images raised %r; one by one now", len(ready), exc)
    results: list[JobResult] = []
    errors: dict[uuid.UUID, str] = {}
    for job, image in zip(ready, images, strict=True):
        try:
            results.extend(predict(model, [job], [image], timeout_s))
        except Exception as exc:
            errors[job.id] = f"the model failed on this image: {exc!r}"
    return results, errors


def predict(
    model: Model, ready: list[ClaimedJob], images: list[np.ndarray], timeout_s: float
) -> list[JobResult]:
    questions = [job.question for job in ready]
    if any(questions):
        # Only vqa models take questions (the gateway refuses them for others).
        call = partial(cast(AsksQuestions, model).predict, images, questions)
    else:
        call = partial(model.predict, images)
    found, sizes, infer_ms = with_timeout(call, timeout_s)
    return [
        JobResult(job.id, result, size, infer_ms)
        for job, result, size in zip(ready, found, sizes, strict=True)
    ]


def with_timeout(call: Callable[[], T], timeout_s: float) -> T:
    """Run ``call`` in a daemon thread and give up waiting after ``timeout_s``. A hung
    model call cannot be killed from Python; its thread is abandoned (and its late result
    dropped) so that the worker goes on serving."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="model-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ModelTimeout(f"the model call took longer than {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return cast(T, box["value"])
