"""Redis key names and state names, in one place (as arq does)."""

from __future__ import annotations

from enum import StrEnum

KEY_PREFIX = "hepato"


class JobState(StrEnum):
    pending = "pending"
    processing = "processing"
    done = "done"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"


TERMINAL_STATES = frozenset({JobState.done, JobState.failed, JobState.canceled, JobState.expired})


class BatchState(StrEnum):
    pending = "pending"
    processing = "processing"
    done = "done"
    done_with_failures = "done_with_failures"


def batch_state(counts: dict[str, int]) -> BatchState:
    """A batch's state from the counts of its jobs per state."""
    unfinished = counts.get(JobState.pending, 0) + counts.get(JobState.processing, 0)
    if unfinished:
        started = sum(counts.values()) - counts.get(JobState.pending, 0)
        return BatchState.processing if started else BatchState.pending
    if counts.get(JobState.failed, 0) or counts.get(JobState.expired, 0):
        return BatchState.done_with_failures
    return BatchState.done


class Priority(StrEnum):
    urgent = "urgent"
    routine = "routine"


def queue_key(model: str, priority: Priority | str) -> str:
    """The Redis list holding job ids of one model and priority."""
    return f"{KEY_PREFIX}:queue:{model}:{Priority(priority).value}"


def queue_keys(model: str) -> list[str]:
    """BLPOP order: urgent before routine gives priority."""
    return [queue_key(model, Priority.urgent), queue_key(model, Priority.routine)]


def batch_events_channel(batch_id: str) -> str:
    """Pub/sub channel woken after a commit that recorded events of the batch's jobs."""
    return f"{KEY_PREFIX}:events:batch:{batch_id}"


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel woken after a commit that recorded events of the job."""
    return f"{KEY_PREFIX}:events:job:{job_id}"


WORKER_HEARTBEAT_TTL_S = 30


def worker_key(worker_id: str) -> str:
    """Set by a worker once its model is loaded, refreshed while it lives (TTL in seconds:
    ``WORKER_HEARTBEAT_TTL_S``)."""
    return f"{KEY_PREFIX}:worker:{worker_id}"


WORKER_KEY_PATTERN = f"{KEY_PREFIX}:worker:*"
