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


# The tenant of the open mode, and of rows from before tenants existed.
PUBLIC_TENANT = "public"


def queue_key(model: str, priority: Priority | str, tenant: str = PUBLIC_TENANT) -> str:
    """The Redis list holding job ids of one model, priority and tenant: one list per
    tenant, so that workers can take turns between tenants (worker.microbatch)."""
    return f"{KEY_PREFIX}:queue:{model}:{Priority(priority).value}:{tenant}"


def queue_keys(model: str, tenant: str = PUBLIC_TENANT) -> list[str]:
    """BLPOP order: urgent before routine gives priority."""
    return [queue_key(model, Priority.urgent, tenant), queue_key(model, Priority.routine, tenant)]


def tenants_key(model: str) -> str:
    """The set of tenants that have had jobs of ``model`` queued: whose lists workers
    read. Never pruned: a tenant with empty lists costs a BLPOP two more keys."""
    return f"{KEY_PREFIX}:tenants:{model}"


def inline_key(job_id: str) -> str:
    """A job's image bytes, pushed with its id so that its worker need not download them
    (common.settings inline_max_bytes); taken, or expired, once."""
    return f"{KEY_PREFIX}:inline:{job_id}"


def hint_key(model: str) -> str:
    """The newest lone real-time job of ``model`` not yet committed, for an idle worker to
    start on (common.dispatch ``hint``, worker.head_start); kept ``HINT_TTL_MS``."""
    return f"{KEY_PREFIX}:hint:{model}"


# A hint no idle worker took within this many milliseconds is of no more use: its job is
# committed and queued by then, and a worker takes it from the queue.
HINT_TTL_MS = 200


def taker_key(job_id: str) -> str:
    """Set by the worker that took a job's hint: the list (``taken_key``) the job's id is
    pushed onto once committed, instead of its queue (common.dispatch ``push``); read and
    removed by that push, or gone after ``TAKER_TTL_MS``."""
    return f"{KEY_PREFIX}:taker:{job_id}"


def taken_key(worker_id: str, model: str) -> str:
    """The ids of ``model`` whose head starts ran on this worker, pushed by their gateway
    once committed; read before any queue. Expires ``TAKEN_TTL_MS`` after its last push,
    so a dead worker's list goes (the sweeper has pushed its ids again by then)."""
    return f"{KEY_PREFIX}:taken:{worker_id}:{model}"


# Milliseconds: longer than a submission takes from its hint to its push (7 ms on the bench
# VM, seconds on a congested Postgres); a push after it goes to the queue as usual.
TAKER_TTL_MS = 5_000
TAKEN_TTL_MS = 600_000


# Retries waiting out their backoff: a sorted set of "<queue key> <job id>" scored by the
# Unix time they are due; workers move due ones back onto their queues.
DELAYED_KEY = f"{KEY_PREFIX}:delayed"


def batch_events_channel(batch_id: str) -> str:
    """Pub/sub channel woken after a commit that recorded events of the batch's jobs."""
    return f"{KEY_PREFIX}:events:batch:{batch_id}"


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel woken after a commit that recorded events of the job."""
    return f"{KEY_PREFIX}:events:job:{job_id}"


def job_finished_channel(job_id: str) -> str:
    """Pub/sub channel woken after the commit that finished a job without a batch (what a
    /v1/predict caller waits for; it is not woken by the job's other events)."""
    return f"{KEY_PREFIX}:finished:job:{job_id}"


WORKER_HEARTBEAT_TTL_S = 30


def worker_key(worker_id: str) -> str:
    """Set by a worker once its model is loaded, refreshed while it lives (TTL in seconds:
    ``WORKER_HEARTBEAT_TTL_S``)."""
    return f"{KEY_PREFIX}:worker:{worker_id}"


WORKER_KEY_PATTERN = f"{KEY_PREFIX}:worker:*"


# The sweeper's proof that Redis still holds what it was given (common.lost_ids): the
# run_id of the Redis whose queues were last compared with the pending jobs. Gone after
# a FLUSHALL, another run_id after a restart: the queues are then compared again.
DISPATCH_MARKER_KEY = f"{KEY_PREFIX}:dispatch:marker"
# Held by the one sweeper making that comparison.
DISPATCH_REPAIR_KEY = f"{KEY_PREFIX}:dispatch:repair"
# Set by the one sweeper per period that looks for single lost ids.
DISPATCH_SCAN_KEY = f"{KEY_PREFIX}:dispatch:scan"
# The pending ids missing from their queues at that look: lost if still missing at the next.
DISPATCH_SUSPECTS_KEY = f"{KEY_PREFIX}:dispatch:suspects"
