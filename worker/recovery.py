"""How a worker gets work back after a fault: the sweeper that finds jobs lost to dead
workers or ids Redis lost, pushes them again and expires the overdue ones (and, when
HEPATO_RETENTION_DAYS is set, deletes old finished work a bounded step at a time, in a
thread of its own; and makes the day partitions of jobs ahead of need); the
heartbeat that says this worker is alive, the re-push of requeued ids, and the retry
that rides out a Postgres restart."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from hepato.common import (
    direct_uploads,
    dispatch,
    jobs,
    lost_ids,
    metrics,
    partitions,
    retention,
)
from hepato.common.constants import WORKER_HEARTBEAT_TTL_S, worker_key
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.sweep import sweep

log = logging.getLogger(__name__)


def db_retry(seconds: float) -> Callable:
    """Ride out a Postgres restart: retry with backoff for up to ``seconds``, saying so
    (an operator, and the chaos suite, can see which write met the outage)."""
    return retry(
        retry=retry_if_exception_type(OperationalError),
        wait=wait_exponential(multiplier=0.1, max=5),
        stop=stop_after_delay(seconds),
        reraise=True,
        before_sleep=_say_retrying,
    )


def _say_retrying(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    name = getattr(state.fn, "__name__", "a database call")
    log.warning("Postgres unavailable in %s (%s); retrying", name, type(error).__name__)


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
        self._store: ObjectStore | None = None
        self._retain_after = 0.0
        self._upkeep_after = 0.0
        self._retainer: threading.Thread | None = None
        self._uploads = direct_uploads.Sweeper(settings)

    def start(self) -> None:
        self.heartbeat()
        self._thread.start()

    def stop(self) -> None:
        self._thread.join(timeout=5)
        if self._retainer is not None:
            self._retainer.join(timeout=5)
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
            try:
                self.upkeep_once()
            except Exception:
                log.warning("partition upkeep failed; the next sweep retries", exc_info=True)
            self._retain_in_background()
            try:  # direct uploads never committed (common.direct_uploads)
                self._uploads.maybe_run(self.engine, self.redis, self.stopping)
            except Exception:
                log.warning("sweep of direct uploads failed; the next retries", exc_info=True)

    def heartbeat(self) -> None:
        """Tell operators (and ``hepato up``) this worker is loaded and alive."""
        with contextlib.suppress(redis.RedisError):
            self.redis.set(
                worker_key(self.worker_id), ",".join(self.models), ex=WORKER_HEARTBEAT_TTL_S
            )

    def sweep_once(self) -> None:
        swept = sweep(self.engine)
        if swept.requeue or swept.failed or swept.expired:
            log.info(
                "sweeper: %d jobs back from lost workers, %d failed out of attempts, "
                "%d expired waiting",
                swept.reclaimed,
                swept.failed,
                swept.expired,
            )
        metrics.LEASES_RECLAIMED.inc(swept.reclaimed + swept.failed)
        self.push(swept.requeue)
        try:
            lost_ids.recover(self.engine, self.redis, self.settings.requeue_pending_after_s)
        except redis.RedisError:
            log.warning("could not look for ids Redis lost; the next sweep will", exc_info=True)

    def upkeep_once(self) -> None:
        """Make the day partitions of today and the days ahead that are missing
        (common.partitions), when due: one worker at a time, the others go on."""
        if time.monotonic() < self._upkeep_after:
            return
        # Days are made days ahead: one not made now (a busy lock) waits for the next.
        self._upkeep_after = time.monotonic() + partitions.UPKEEP_INTERVAL_S
        made = partitions.ensure(self.engine, self.settings.partition_days_ahead)
        if made:
            log.info("partitions made for %s", ", ".join(map(str, made)))

    def _retain_in_background(self) -> None:
        """``retain_once`` in a thread of its own: a day's survey reads its whole partition
        (common.retention_days), longer than the heartbeat may wait."""
        if self._retainer is not None and self._retainer.is_alive():
            return
        self._retainer = threading.Thread(target=self._retain_logged, name="retention", daemon=True)
        self._retainer.start()

    def _retain_logged(self) -> None:
        try:
            self.retain_once()
        except Exception:
            log.warning("retention failed; the next sweep retries", exc_info=True)

    def retain_once(self) -> None:
        """A bounded step of retention (common.retention) when it is on and due: at most
        retention_chunks_per_sweep transactions, so the heartbeat is not held up; one
        worker at a time (the others find the lock taken and go on)."""
        days = self.settings.retention_days
        if not days or time.monotonic() < self._retain_after:
            return
        if self._store is None:
            self._store = ObjectStore(self.settings, pool_size=4)
        done = retention.run(
            self.engine,
            self._store,
            days,
            chunk=self.settings.retention_chunk,
            max_chunks=self.settings.retention_chunks_per_sweep,
            stop=self.stopping,
        )
        if done.jobs or done.idempotency_keys or done.webhook_deliveries:
            log.info("retention: %s", done.counts())
        # Behind: go on at the next sweep; caught up (or another worker's turn): wait.
        wait = self.settings.sweep_interval_s if done.more else self.settings.retention_interval_s
        self._retain_after = time.monotonic() + wait

    def push(self, requeue: Sequence[jobs.Requeue]) -> None:
        """Put requeued jobs back on their own model's and priority's queue (a retry in
        its backoff into the delayed set)."""
        try:
            dispatch.requeue(self.redis, requeue)
        except redis.RedisError:
            log.warning("could not re-push %d jobs; the sweeper will retry", len(requeue))
