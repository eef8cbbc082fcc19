"""The worker loop: collect a microbatch, claim it, fetch, infer, write, repeat."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import redis
from sqlalchemy.exc import OperationalError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from common import jobs, queue
from common.constants import WORKER_HEARTBEAT_TTL_S, job_done_channel, queue_keys, worker_key
from common.db import get_engine
from common.exceptions import InvalidImage, ObjectFetchError
from common.jobs import ClaimedJob, JobResult
from common.settings import Settings
from common.storage import ObjectStore
from worker.decode import decode_bgr
from worker.grouping import Prediction

log = logging.getLogger(__name__)


class Detector(Protocol):
    def predict(self, images: list[np.ndarray]) -> Prediction: ...


def _db_retry(seconds: float) -> Callable:
    """Ride out a Postgres restart: retry with backoff for up to ``seconds``."""
    return retry(
        retry=retry_if_exception_type(OperationalError),
        wait=wait_exponential(multiplier=0.1, max=5),
        stop=stop_after_delay(seconds),
        reraise=True,
    )


class Worker:
    def __init__(self, settings: Settings, detector: Detector, *, burst: bool = False) -> None:
        self.settings = settings
        self.detector = detector
        self.burst = burst
        self.model = settings.model_name
        self.keys = queue_keys(self.model)
        self.id = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.engine = get_engine(settings.database_url)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.store = ObjectStore(settings, pool_size=settings.fetch_concurrency)
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="fetch")
        self.stopping = threading.Event()
        self.batches = 0
        self.jobs_done = 0

    # --- lifecycle -------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self._heartbeat()
        sweeper = threading.Thread(target=self._sweep_loop, name="sweeper", daemon=True)
        sweeper.start()
        log.info(
            "worker %s serving %s (batch<=%d, wait<=%.0fms)",
            self.id,
            self.model,
            self.settings.max_batch_size,
            self.settings.max_wait_ms,
        )
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                ids = queue.collect_batch(
                    self.redis,
                    self.keys,
                    self.settings.max_batch_size,
                    self.settings.max_wait_ms / 1000.0,
                    self.settings.poll_timeout_s,
                )
                if ids:
                    self.process(ids)
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
        log.info(
            "worker %s stopped after %d batches, %d jobs", self.id, self.batches, self.jobs_done
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: finishing the batch in hand, then exiting", signum)
        self.stopping.set()

    def _drained(self) -> bool:
        self.sweep_once()
        return jobs.count_unfinished(self.engine, self.model) == 0

    # --- one microbatch --------------------------------------------------------
    def process(self, ids: Sequence[str]) -> None:
        token, claimed = _db_retry(self.settings.lease_s)(jobs.claim)(
            self.engine, ids, self.id, self.settings.lease_s
        )
        if not claimed:
            return
        self.batches += 1
        try:
            with self._lease_keeper(token, [c.id for c in claimed]):
                self._run_batch(token, claimed)
        except Exception as exc:
            # Back to the queue now rather than after the lease; the attempt counts, so an
            # input that breaks the model ends failed after max_attempts, not in a loop.
            log.exception("batch of %d failed", len(claimed))
            errors = {c.id: f"batch failed: {exc!r}" for c in claimed}
            try:
                self._push(jobs.fail(self.engine, token, errors, retry=True))
            except Exception:
                log.exception("could not return the batch; the sweeper will recover it")

    def _run_batch(self, token: uuid.UUID, claimed: list[ClaimedJob]) -> None:
        datas = list(self.fetch_pool.map(self._fetch, claimed))
        images: list[np.ndarray] = []
        ready: list[ClaimedJob] = []
        transient: dict[uuid.UUID, str] = {}
        permanent: dict[uuid.UUID, str] = {}
        for job, data in zip(claimed, datas, strict=True):
            if isinstance(data, ObjectFetchError):
                transient[job.id] = str(data)
                continue
            try:
                images.append(decode_bgr(data))
                ready.append(job)
            except InvalidImage as exc:
                permanent[job.id] = str(exc)
        results: list[JobResult] = []
        if images:
            detections, sizes, infer_ms = self.detector.predict(images)
            results = [
                JobResult(job.id, dets, size, infer_ms)
                for job, dets, size in zip(ready, detections, sizes, strict=True)
            ]
        write = _db_retry(self.settings.lease_s)
        written = write(jobs.complete)(self.engine, token, results)
        lost = len(results) - len(written)
        if lost:
            log.warning("%d results refused: their lease passed to another worker", lost)
        write(jobs.fail)(self.engine, token, permanent, retry=False)
        self._push(write(jobs.fail)(self.engine, token, transient, retry=True))
        self.jobs_done += len(written)
        self._notify([*written, *permanent, *transient])

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
            self.redis.set(worker_key(self.id), self.model, ex=WORKER_HEARTBEAT_TTL_S)

    def sweep_once(self) -> None:
        requeue, failed = jobs.sweep(self.engine, self.settings.requeue_pending_after_s)
        if requeue or failed:
            log.info("sweeper: re-pushed %d jobs, failed %d out of attempts", len(requeue), failed)
        self._push(requeue)

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


def run_worker(settings: Settings, *, burst: bool = False) -> Worker:
    from worker.detector import YoloDetector

    started = time.perf_counter()
    detector = YoloDetector(
        settings.model_weights,
        imgsz=settings.model_imgsz,
        conf=settings.model_conf,
        iou=settings.model_iou,
        device=settings.device,
        threads=settings.torch_threads,
        config_dir=settings.ultralytics_dir,
    )
    log.info("model ready in %.1fs", time.perf_counter() - started)
    worker = Worker(settings, detector, burst=burst)
    worker.run()
    return worker
