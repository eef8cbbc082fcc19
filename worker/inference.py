"""The model stage's call: a microbatch through the model, time-bounded, with a poison
input isolated to its own job; and, for models with phases, the pre- and post-processing
the intake and write stages do around it."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar, cast

import numpy as np

from hepato.common import cpus
from hepato.common.exceptions import ModelUnavailable
from hepato.common.jobs import ClaimedJob, JobResult
from hepato.common.results import TaskResult
from hepato.common.settings import Settings
from hepato.worker.backends.base import AsksQuestions, Model
from hepato.worker.backends.calls import Phased, Prepared

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelTimeout(Exception):
    pass


def infer(
    model: Model, ready: list[ClaimedJob], images: list[np.ndarray], timeout_s: float
) -> tuple[list[JobResult], dict[uuid.UUID, str]]:
    """Results, and the jobs to retry. A model call that raises on a microbatch is run
    again one image at a time, so that one poison input costs only its own job an
    attempt; a call that overruns ``timeout_s``, or finds the model's server unreachable
    (ModelUnavailable), retries the whole batch."""
    if not ready:
        return [], {}
    try:
        return predict(model, ready, images, timeout_s), {}
    except (ModelTimeout, ModelUnavailable) as exc:
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
    """Run ``call`` on a model-call thread and give up waiting after ``timeout_s``. A hung
    model call cannot be killed from Python; its thread is abandoned (and its late result
    dropped) so that the worker goes on serving. Threads are kept between calls: ONNX
    Runtime runs part of each call on its calling thread, and a fresh one per call cost
    about 4 % of the model's throughput at batch 16."""
    with _IDLE_LOCK:
        caller = _IDLE.pop() if _IDLE else _Caller()
    done: Future[T] = Future()
    caller.inbox.put((call, done))
    concurrent.futures.wait([done], timeout_s)
    if not done.done():
        raise ModelTimeout(f"the model call took longer than {timeout_s:g}s")
    with _IDLE_LOCK:
        _IDLE.append(caller)
    return done.result()


class _Caller:
    """A model-call thread: runs the calls put in its inbox, one at a time."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="model-call", daemon=True).start()

    def _serve(self) -> None:
        if _MODEL_CORES:
            cpus.pin(_MODEL_CORES)
        while True:
            call, done = self.inbox.get()
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)


# Model-call threads whose last call ended in time (a hung one is never put back).
_IDLE: list[_Caller] = []
_IDLE_LOCK = threading.Lock()
# The cores model-call threads start on (settings.model_cpus: ``load_pinned``); None:
# their starter's.
_MODEL_CORES: frozenset[int] | None = None


def load_pinned(settings: Settings, load: Callable[[], dict[str, Model]]) -> dict[str, Model]:
    """The models ``load`` returns, their runtimes' thread pools started on
    ``settings.model_cpus`` and every model call from now on run there; the calling thread,
    and what it starts after, on the rest of the cores (common.cpus)."""
    global _MODEL_CORES
    split = cpus.split(settings.model_cpus)
    if split is None:
        return load()
    cpus.pin(split.model)
    try:
        models = load()
    finally:
        cpus.pin(split.rest)
    _MODEL_CORES = split.model
    log.info(
        "model threads on cores %s, the rest of the worker on %s",
        cpus.format_list(split.model),
        cpus.format_list(split.rest),
    )
    return models


def warm_up(model: Model, batches: Iterable[int], timeout_s: float) -> None:
    """Run ``model`` once per microbatch size of ``batches`` on blank images of its input
    size, so that the first jobs of each size do not pay the runtime's first-run costs
    (ONNX Runtime plans its memory per input shape: a first batch of 16 at 320 px took a
    third longer than the next). A model served by Triton is left alone: that server
    warms its own. A failure is logged, not raised: the jobs would meet it anyway."""
    if model.manifest.backend == "triton":
        return
    size = model.manifest.input_size
    blank = np.full((size, size, 3), 114, np.uint8)
    for batch in sorted(set(batches)):
        started = time.perf_counter()
        try:
            with_timeout(partial(model.predict, [blank] * batch), timeout_s)
        except Exception as exc:
            log.warning("warming %s up at batch %d failed: %r", model.manifest.name, batch, exc)
            return
        log.info(
            "%s warmed up at batch %d in %.0f ms",
            model.manifest.name,
            batch,
            (time.perf_counter() - started) * 1000.0,
        )


# --- models with phases (worker.backends.calls.Phased) -------------------------------
def phases(model: Model) -> Phased[Any, Any, TaskResult] | None:
    if all(callable(getattr(model, name, None)) for name in ("prepare", "run", "finish")):
        return cast(Phased[Any, Any, TaskResult], model)
    return None


def prepare(model: Model, ready: list[ClaimedJob], images: list[np.ndarray]) -> Prepared | None:
    """The model's own pre-processing, done in the intake stage, where the model has one.
    None: the model stage runs ``predict`` as a whole (and isolates a poison input)."""
    phased = phases(model)
    if phased is None or not images or any(job.question for job in ready):
        return None
    try:
        return phased.prepare(images)
    except Exception:
        log.warning("pre-processing %d images failed; the model stage takes them", len(images))
        return None


def run_prepared(
    model: Model, ready: list[ClaimedJob], prepared: Prepared, timeout_s: float
) -> tuple[list[Any] | None, float, dict[uuid.UUID, str]]:
    """The model call alone: its raw outputs and time in ms; or None and the jobs to
    retry when it overran; or None and no errors when it raised (then ``infer`` runs the
    batch again, image by image, to find the culprit)."""
    phased = cast(Phased[Any, Any, TaskResult], model)
    started = time.perf_counter()
    try:
        raws = with_timeout(partial(phased.run, prepared), timeout_s)
    except (ModelTimeout, ModelUnavailable) as exc:
        log.error("%s; %d jobs go back to the queue", exc, len(ready))
        return None, 0.0, {job.id: str(exc) for job in ready}
    except Exception as exc:
        log.warning("model call on %d images raised %r; one by one now", len(ready), exc)
        return None, 0.0, {}
    return raws, (time.perf_counter() - started) * 1000.0, {}


def finish(
    model: Model,
    ready: list[ClaimedJob],
    images: list[np.ndarray],
    prepared: Prepared,
    raws: list[Any],
    infer_ms: float,
    timeout_s: float,
) -> tuple[list[JobResult], dict[uuid.UUID, str]]:
    """Post-processing, done in the write stage. Should it raise, the images go through
    the model again one by one, so only a culprit's job pays for it."""
    try:
        found, sizes = cast(Phased[Any, Any, TaskResult], model).finish(prepared, raws)
    except Exception:
        log.warning("post-processing %d results failed; one by one now", len(ready))
        return infer(model, ready, images, timeout_s)
    return [
        JobResult(job.id, result, size, infer_ms)
        for job, result, size in zip(ready, found, sizes, strict=True)
    ], {}
