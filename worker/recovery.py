"""How a worker gets work back after a fault: the sweeper that finds jobs lost to dead
workers or dropped ids and pushes them again, the heartbeat that says this worker is
alive, the re-push of requeued ids, and the retry that rides out a Postgres restart."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from hepato.common import dispatch, jobs, metrics, webhooks
from hepato.common.constants import WORKER_HEARTBEAT_TTL_S, worker_key
from hepato.common.settings import Settings
from hepato.common.sweep import sweep

log = logging.getLogger(__name__)


def db_retry(seconds: float) -> Callable:
    """Ride out a Postgres restart: retry with backoff for up to ``seconds``."""
    return retry(
        retry=retry_if_exception_type(OperationalError),
        wait=wait_exponential(multiplier=0.1, max=5),
        stop=stop_after_delay(seconds),
        reraise=True,
    )


class Recovery:
    """The worker's sweeper thread and heartbeat; runs until ``stopping`` is set."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        worker_id: str,
        models: Sequence[str],
        stopping: threading.Event,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = client
        self.worker_id = worker_id
        self.models = list(models)
        self.stopping = stopping
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)

    def start(self) -> None:
        self.heartbeat()
        self._thread.start()

    def stop(self) -> None:
        self._thread.join(timeout=5)
        # Gone at once rather than after the TTL: operators see the worker has stopped.
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(worker_key(self.worker_id))

    def _loop(self) -> None:
        # Wake often enough to keep the heartbeat from expiring; sweep less often.
        every = min(self.settings.sweep_interval_s, WORKER_HEARTBEAT_TTL_S / 3)
        last_sweep = time.monotonic()
        while not self.stopping.wait(every):
            self.heartbeat()
            if time.monotonic() - last_sweep < self.settings.sweep_interval_s:
                continue
            last_sweep = time.monotonic()
            try:
                self.sweep_once()
            except Exception:
                log.warning("sweep failed", exc_info=True)

    def heartbeat(self) -> None:
        """Tell operators (and ``hepato up``) this worker is loaded and alive."""
        with contextlib.suppress(redis.RedisError):
            self.redis.set(
                worker_key(self.worker_id), ",".join(self.models), ex=WORKER_HEARTBEAT_TTL_S
            )

    def sweep_once(self) -> None:
        swept = sweep(self.engine, self.settings.requeue_pending_after_s)
        if swept.requeue or swept.failed:
            log.info(
                "sweeper: re-pushed %d jobs (%d from lost workers), failed %d out of attempts",
                len(swept.requeue),
                swept.reclaimed,
                swept.failed,
            )
        metrics.LEASES_RECLAIMED.inc(swept.reclaimed + swept.failed)
        self.push(swept.requeue)
        webhooks.deliver_due(self.engine, self.settings)

    def push(self, requeue: Sequence[jobs.Requeue]) -> None:
        """Put requeued jobs back on their own model's and priority's queue."""
        by_queue: dict[tuple[str, str], list[str]] = {}
        for r in requeue:
            by_queue.setdefault((r.model, r.priority), []).append(str(r.id))
        for (model, priority), ids in by_queue.items():
            try:
                dispatch.push(self.redis, model, priority, ids)
            except redis.RedisError:
                log.warning("could not re-push %d jobs; the sweeper will retry", len(ids))
