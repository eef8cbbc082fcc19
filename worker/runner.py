"""The worker loop: collect a microbatch of one model, claim it, fetch, infer, write,
repeat. One worker serves one or more models, taking turns between them."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar, cast

import numpy as np
import redis
from sqlalchemy.exc import OperationalError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from common import events, jobs, queue, webhooks
from common.constants import WORKER_HEARTBEAT_TTL_S, job_done_channel, worker_key
from common.db import get_engine
from common.exceptions import InvalidImage, ObjectFetchError, ObjectMissing, UnknownModel
from common.jobs import ClaimedJob, JobResult
from common.manifest import load_registry
from common.queue import ModelQueue
from common.settings import Settings
from common.storage import ObjectStore
from worker.backends.base import AsksQuestions, Model, Runtime, load_model
from worker.decode import Decode, DecoderFault, IsolatedDecoder, decode_rgb

log = logging.getLogger(__name__)

T = TypeVar("T")


def _db_retry(seconds: float) -> Callable:
    """Ride out a Postgres restart: retry with backoff for up to ``seconds``."""
    return retry(
        retry=retry_if_exception_type(OperationalError),
        wait=wait_exponential(multiplier=0.1, max=5),
        stop=stop_after_delay(seconds),
        reraise=True,
    )


class Worker:
    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, Model],
        *,
        burst: bool = False,
        decode: Decode = decode_rgb,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self.burst = burst
        self.queues = [self._queue(name, model) for name, model in self.models.items()]
        self.turn = 0
        self.id = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.engine = get_engine(settings.database_url)
        self.redis = redis.Redis.from_url(settings.redis_url)
        events.attach(self.engine, self.redis)
        self.store = ObjectStore(settings, pool_size=settings.fetch_concurrency)
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="fetch")
        self.decoder = IsolatedDecoder(settings.decode_processes, settings.decode_timeout_s, decode)
        self.stopping = threading.Event()
        self.batches = 0
        self.jobs_done = 0

    # --- lifecycle -------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        # Decoder processes start before the heartbeat that tells hepato up we are ready.
        self.decoder.warm()
        self._heartbeat()
        sweeper = threading.Thread(target=self._sweep_loop, name="sweeper", daemon=True)
        sweeper.start()
        for q in self.queues:
            log.info(
                "worker %s serving %s (batch<=%d, wait<=%.0fms)",
                self.id,
                q.model,
                q.max_batch,
                q.max_wait_s * 1000,
            )
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                got = queue.collect_any(self.redis, self._rotation(), self.settings.poll_timeout_s)
                if got and self.stopping.is_set():
                    # Popped after SIGTERM: not ours to start. Back on their own queues;
                    # the jobs are still pending in Postgres.
                    self._push(jobs.pending_among(self.engine, got[1]))
                elif got:
                    self.process(got[0].model, got[1])
                elif self.burst and self._drained():
                    break
                backoff = 0.1
            except (redis.RedisError, OperationalError) as exc:
                # Ids popped but not claimed are safe: their jobs are still pending in
                # Postgres, and the sweeper pushes them again.
                log.warning("service unavailable (%s); retrying in %.1fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.stopping.set()
        sweeper.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(worker_key(self.id))
        self.fetch_pool.shutdown(wait=False)
        self.decoder.close()
        log.info(
            "worker %s stopped after %d batches, %d jobs", self.id, self.batches, self.jobs_done
        )

    def _queue(self, name: str, model: Model) -> ModelQueue:
        cap, wait_ms = self.settings.max_batch_size, self.settings.max_wait_ms
        size = model.manifest.max_batch_size
        return ModelQueue(
            name,
            min(size, cap) if cap else size,
            (model.manifest.max_wait_ms if wait_ms is None else wait_ms) / 1000.0,
        )

    def _rotation(self) -> list[ModelQueue]:
        """Each turn starts with the next model, so a busy model cannot starve the rest."""
        k = self.turn % len(self.queues)
        self.turn += 1
        return self.queues[k:] + self.queues[:k]

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: finishing the batch in hand, then exiting", signum)
        self.stopping.set()

    def _drained(self) -> bool:
        self.sweep_once()
        return jobs.count_unfinished(self.engine, list(self.models)) == 0

    # --- one microbatch --------------------------------------------------------
    def process(self, model: str, ids: Sequence[str]) -> None:
        token, claimed = _db_retry(self.settings.lease_s)(jobs.claim)(
            self.engine, ids, self.id, self.settings.lease_s
        )
        if not claimed:
            return
        self.batches += 1
        try:
            with self._lease_keeper(token, [c.id for c in claimed]):
                self._run_batch(self.models[model], token, claimed)
        except Exception as exc:
            # Back to the queue now rather than after the lease; the attempt counts, so an
            # input that breaks the model ends failed after max_attempts, not in a loop.
            log.exception("batch of %d failed", len(claimed))
            errors = {c.id: f"batch failed: {exc!r}" for c in claimed}
            try:
                self._push(jobs.fail(self.engine, token, errors, retry=True))
            except Exception:
                log.exception("could not return the batch; the sweeper will recover it")

    def _run_batch(self, model: Model, token: uuid.UUID, claimed: list[ClaimedJob]) -> None:
        datas = list(self.fetch_pool.map(self._fetch, claimed))
        transient: dict[uuid.UUID, str] = {}
        permanent: dict[uuid.UUID, str] = {}
        fetched: list[tuple[ClaimedJob, bytes]] = []
        for job, data in zip(claimed, datas, strict=True):
            if isinstance(data, ObjectMissing):
                permanent[job.id] = str(data)
            elif isinstance(data, ObjectFetchError):
                transient[job.id] = str(data)
            else:
                fetched.append((job, data))
        ready: list[ClaimedJob] = []
        images: list[np.ndarray] = []
        decoded = self.decoder.decode_all([data for _, data in fetched])
        for (job, _), image in zip(fetched, decoded, strict=True):
            if isinstance(image, InvalidImage):
                permanent[job.id] = str(image)
            elif isinstance(image, DecoderFault):
                transient[job.id] = str(image)
            else:
                ready.append(job)
                images.append(image)
        results, model_errors = self._infer(model, ready, images)
        transient.update(model_errors)
        write = _db_retry(self.settings.lease_s)
        written = write(jobs.complete)(self.engine, token, results, model.manifest.version)
        lost = len(results) - len(written)
        if lost:
            log.warning("%d results refused: their lease passed to another worker", lost)
        write(jobs.fail)(self.engine, token, permanent, retry=False)
        self._push(write(jobs.fail)(self.engine, token, transient, retry=True))
        self.jobs_done += len(written)
        self._notify([*written, *permanent, *transient])

    def _infer(
        self, model: Model, ready: list[ClaimedJob], images: list[np.ndarray]
    ) -> tuple[list[JobResult], dict[uuid.UUID, str]]:
        """Results, and the jobs to retry. A model call that raises on a microbatch is
        run again one image at a time, so that one poison input costs only its own job an
        attempt; a call that overruns ``model_timeout_s`` retries the whole batch."""
        if not ready:
            return [], {}
        try:
            return self._predict(model, ready, images), {}
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
                results.extend(self._predict(model, [job], [image]))
            except Exception as exc:
                errors[job.id] = f"the model failed on this image: {exc!r}"
        return results, errors

    def _predict(
        self, model: Model, ready: list[ClaimedJob], images: list[np.ndarray]
    ) -> list[JobResult]:
        questions = [job.question for job in ready]
        if any(questions):
            # Only vqa models take questions (the gateway refuses them for others).
            call = partial(cast(AsksQuestions, model).predict, images, questions)
        else:
            call = partial(model.predict, images)
        found, sizes, infer_ms = _with_timeout(call, self.settings.model_timeout_s)
        return [
            JobResult(job.id, result, size, infer_ms)
            for job, result, size in zip(ready, found, sizes, strict=True)
        ]

    def _fetch(self, job: ClaimedJob) -> bytes | ObjectFetchError:
        try:
            return self.store.get(job.object_key)
        except ObjectFetchError as exc:
            return exc

    # --- leases, recovery, notices --------------------------------------------
    @contextmanager
    def _lease_keeper(self, token: uuid.UUID, ids: list[uuid.UUID]) -> Iterator[None]:
        done = threading.Event()

        def keep() -> None:
            while not done.wait(self.settings.lease_extend_every_s):
                try:
                    jobs.extend_leases(self.engine, token, ids, self.settings.lease_s)
                except Exception:
                    log.warning("could not extend leases", exc_info=True)

        thread = threading.Thread(target=keep, name="lease-keeper", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _sweep_loop(self) -> None:
        every = min(self.settings.sweep_interval_s, WORKER_HEARTBEAT_TTL_S / 3)
        last_sweep = time.monotonic()
        while not self.stopping.wait(every):
            self._heartbeat()
            if time.monotonic() - last_sweep < self.settings.sweep_interval_s:
                continue
            last_sweep = time.monotonic()
            try:
                self.sweep_once()
            except Exception:
                log.warning("sweep failed", exc_info=True)

    def _heartbeat(self) -> None:
        """Tell operators (and ``hepato up``) this worker is loaded and alive."""
        with contextlib.suppress(redis.RedisError):
            self.redis.set(worker_key(self.id), ",".join(self.models), ex=WORKER_HEARTBEAT_TTL_S)

    def sweep_once(self) -> None:
        requeue, failed = jobs.sweep(self.engine, self.settings.requeue_pending_after_s)
        if requeue or failed:
            log.info("sweeper: re-pushed %d jobs, failed %d out of attempts", len(requeue), failed)
        self._push(requeue)
        webhooks.deliver_due(self.engine, self.settings)

    def _push(self, requeue: Sequence[jobs.Requeue]) -> None:
        by_queue: dict[tuple[str, str], list[str]] = {}
        for r in requeue:
            by_queue.setdefault((r.model, r.priority), []).append(str(r.id))
        for (model, priority), ids in by_queue.items():
            try:
                queue.push(self.redis, model, priority, ids)
            except redis.RedisError:
                log.warning("could not re-push %d jobs; the sweeper will retry", len(ids))

    def _notify(self, ids: Sequence[uuid.UUID]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.publish(job_done_channel(str(job_id)), "1")
            pipe.execute()
        except redis.RedisError:
            pass  # waiters re-read Postgres; the notice only saves them latency


class ModelTimeout(Exception):
    pass


def _with_timeout(call: Callable[[], T], timeout_s: float) -> T:
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


def load_models(settings: Settings, names: Sequence[str] = ()) -> dict[str, Model]:
    """Load the named models (else the settings' worker_models, else the default model)
    from the manifests, each once."""
    registry = load_registry(settings.models_dir)
    names = list(dict.fromkeys(names or settings.worker_models or [settings.default_model]))
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UnknownModel(
            f"no manifest for {', '.join(map(repr, unknown))} in {settings.models_dir}; "
            f"available: {', '.join(sorted(registry)) or 'none'}"
        )
    runtime = Runtime(settings.device, settings.cpu_threads, settings.ultralytics_dir)
    loaded = {}
    for name in names:
        started = time.perf_counter()
        loaded[name] = load_model(registry[name], runtime)
        log.info("model %s ready in %.1fs", name, time.perf_counter() - started)
    return loaded


def run_worker(settings: Settings, *, burst: bool = False, models: Sequence[str] = ()) -> Worker:
    worker = Worker(settings, load_models(settings, models), burst=burst)
    worker.run()
    return worker
