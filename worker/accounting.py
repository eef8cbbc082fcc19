"""What a worker counts of its microbatches: time per stage, and outcomes per model, for
its Prometheus /metrics."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine

from hepato.common import jobs, metrics
from hepato.common.job_counts import count_failed_by
from hepato.worker.microbatch import MicroBatch


@contextlib.contextmanager
def timed(model: str, stage: str, into: dict[str, float] | None = None) -> Iterator[None]:
    """Time a step of a microbatch for /metrics, and, ``into`` its stages (ms), for the
    breakdown of its jobs (common.stages)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        spent = time.perf_counter() - started
        metrics.STAGE_SECONDS.labels(model, stage).observe(spent)
        if into is not None:
            # A step may come in parts (decode: the images decoded during the claim and
            # those downloaded after it).
            into[stage] = into.get(stage, 0.0) + spent * 1000.0


def count_outcome(
    engine: Engine, batch: MicroBatch, written: set[uuid.UUID], retried: Sequence[jobs.Requeue]
) -> None:
    name = batch.model
    now = datetime.now(UTC)
    for job in batch.claimed:
        if job.id in written and job.created_at is not None:
            metrics.LATENCY_SECONDS.labels(name).observe((now - job.created_at).total_seconds())
    # Only the failures this batch's lease wrote: a fenced-out worker failed nothing.
    errored = [*batch.permanent, *batch.transient]
    dead = count_failed_by(engine, batch.token, errored) if errored else 0
    metrics.JOBS.labels(name, "done").inc(len(written))
    metrics.JOBS.labels(name, "retried").inc(len(retried))
    metrics.JOBS.labels(name, "failed").inc(dead)
    metrics.RETRIES.labels(name).inc(len(retried))
    metrics.DEAD_LETTERED.labels(name).inc(dead)
