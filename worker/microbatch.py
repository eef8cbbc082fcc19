"""Where a microbatch is formed, and what it carries through the worker's stages.

    pop      BLPOP over every model's urgent list, then every model's routine list
    fill     LPOP up to that model's max batch, waiting at most its max_wait for stragglers
    rotate   each turn starts with the next model, so a busy model cannot starve another
    claim    the popped ids become a ``MicroBatch`` under one lease token

The collector (``collect_any``) is a function of a Redis client, the queues in this
turn's order and a poll timeout, and ``Rotation`` is a small class, so each can be tested
alone with a pre-filled queue. ``Batcher`` puts the four steps together for the worker."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar, cast

import numpy as np
import redis
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from hepato.common import dispatch, jobs, metrics, stages
from hepato.common.claim import claim as claim_jobs
from hepato.common.claim import pending_among
from hepato.common.constants import (
    PUBLIC_TENANT,
    hint_key,
    queue_keys,
    taken_key,
)
from hepato.common.jobs import ClaimedJob, JobResult
from hepato.common.manifest import ModelManifest
from hepato.common.settings import Settings
from hepato.worker.backends.calls import Prepared
from hepato.worker.recovery import db_retry

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a fill looks for stragglers while the model is busy, s: each look is one
# round trip; a straggler waits at most this long for it.
FILL_POLL_S = 0.002


@dataclass(frozen=True)
class ModelQueue:
    """One model's queues of one tenant, and how the model's microbatches are formed."""

    model: str
    max_batch: int
    max_wait_s: float
    tenant: str = PUBLIC_TENANT

    @property
    def keys(self) -> list[str]:
        return queue_keys(self.model, self.tenant)


def model_queue(name: str, manifest: ModelManifest, settings: Settings) -> ModelQueue:
    """The model's own batch limits, unless the settings cap or override them."""
    cap, wait_ms = settings.max_batch_size, settings.max_wait_ms
    size = manifest.max_batch_size
    return ModelQueue(
        name,
        min(size, cap) if cap else size,
        (manifest.max_wait_ms if wait_ms is None else wait_ms) / 1000.0,
    )


@dataclass
class MicroBatch:
    """One claimed microbatch on its way through intake → inference → write."""

    model: str
    token: uuid.UUID
    claimed: list[ClaimedJob]
    # Filled by intake: the decoded images of the jobs that are ready for the model.
    ready: list[ClaimedJob] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    fetched_at: datetime | None = None
    # Errors by job: permanent ones end the job, transient ones send it back to the queue.
    permanent: dict[uuid.UUID, str] = field(default_factory=dict)
    transient: dict[uuid.UUID, str] = field(default_factory=dict)
    # A phased model's input, prepared by intake (None: the model stage runs predict).
    prepared: Prepared | None = None
    # Filled by the model stage: a phased model's raw outputs (finished by the write
    # stage), or the results.
    raws: list[Any] | None = None
    infer_ms: float = 0.0
    results: list[JobResult] = field(default_factory=list)
    inferred_at: datetime | None = None
    # The worker's steps of this microbatch, ms (common.stages), and when it was last
    # handed to the next stage (time.perf_counter), to time its wait there.
    stages: dict[str, float] = field(default_factory=dict)
    handed_at: float | None = None
    # A head start (worker.head_start): run before its job was claimed, never written;
    # and, on the claimed batch of that job, the head start whose results it takes.
    speculative: bool = False
    head: MicroBatch | None = None

    def waited(self, stage: str) -> None:
        """Record, as ``stage``, how long the batch waited since it was handed on."""
        if self.handed_at is not None:
            self.stages[stage] = (time.perf_counter() - self.handed_at) * 1000.0

    @property
    def ids(self) -> list[uuid.UUID]:
        return [job.id for job in self.claimed]

    @property
    def attempts(self) -> list[int]:
        return [job.attempts for job in self.claimed]


@dataclass(frozen=True)
class Hint:
    """A lone job announced before its commit (common.dispatch ``hint``): not yet ours."""

    model: str
    job_id: str


# --- pop and fill ---------------------------------------------------------------------
def collect_batch(
    client: redis.Redis,
    keys: Sequence[str],
    max_batch: int,
    max_wait_s: float,
    poll_timeout_s: float,
    busy: Callable[[], bool] = lambda: True,
) -> list[str]:
    """Block up to ``poll_timeout_s`` for a first id, then fill up to ``max_batch``,
    waiting at most ``max_wait_s`` after the first for stragglers, and only while
    ``busy()``. Keys are read in order, so earlier keys (urgent) always go first.
    Returns [] if nothing came."""
    first = client.blpop(list(keys), timeout=poll_timeout_s)
    if first is None:
        return []
    return _fill(client, keys, [_text(first[1])], max_batch, max_wait_s, busy)


def collect_any(
    client: redis.Redis,
    queues: Sequence[ModelQueue],
    poll_timeout_s: float,
    busy: Callable[[], bool] = lambda: True,
    hints: Mapping[str, str] | None = None,
    alone: Callable[[str], bool] = lambda _: False,
    taken: Mapping[str, str] | None = None,
) -> tuple[ModelQueue, list[str]] | Hint | None:
    """A microbatch of one model, from whichever of ``queues`` has work: every model's
    urgent queue before any routine one, and among equals the first in ``queues``. The
    caller rotates ``queues`` between calls so that no model, and no tenant, starves
    another. The batch is filled from the first queue's tenant, then from the other
    tenants' queues of the same model (urgent first). Stragglers are waited for only
    while ``busy()`` (the model is still on an earlier batch): an idle model would only
    wait with it, and a lone urgent job would pay the whole ``max_wait``. ``hints``: the
    models by their hint keys, read after every queue (queued work goes before a hint);
    ``taken``: the models by the keys of the ids whose hints this worker took, read
    before every queue, each id alone. A first id that is to go ``alone`` is not filled
    up."""
    by_key = {key: q for q in queues for key in q.keys}
    urgent = [q.keys[0] for q in queues]
    routine = [q.keys[1] for q in queues]
    hints, taken = hints or {}, taken or {}
    first = client.blpop([*taken, *urgent, *routine, *hints], timeout=poll_timeout_s)
    if first is None:
        return None
    key, value = _text(first[0]), _text(first[1])
    if key in hints:
        return Hint(hints[key], value)
    if key in taken:
        return next(q for q in queues if q.model == taken[key]), [value]
    owner = by_key[key]
    if alone(value):
        return owner, [value]
    same = [q for q in queues if q.model == owner.model and q != owner]
    keys = [owner.keys[0], *(q.keys[0] for q in same), owner.keys[1], *(q.keys[1] for q in same)]
    return owner, _fill(client, keys, [value], owner.max_batch, owner.max_wait_s, busy)


def _fill(
    client: redis.Redis,
    keys: Sequence[str],
    batch: list[str],
    max_batch: int,
    max_wait_s: float,
    busy: Callable[[], bool] = lambda: True,
) -> list[str]:
    # Stragglers are polled for, not waited for in a BLPOP: Redis times a blocked client
    # out only at its timer's tick (hz 10: every 100 ms), so a 10 ms BLPOP on an idle
    # Redis took 100 ms; and a poll sees the model free up, which a BLPOP would sleep
    # through.
    deadline = time.monotonic() + max_wait_s
    while True:
        if len(batch) < max_batch:
            batch.extend(_text(x) for x in _pop_up_to(client, keys, max_batch - len(batch)))
        remaining = deadline - time.monotonic()
        if len(batch) >= max_batch or remaining <= 0 or not busy():
            return batch
        time.sleep(min(FILL_POLL_S, remaining))


# Up to ARGV[1] ids from KEYS in order, in one round trip (LPOP with a count: Redis >= 6.2).
_POP_UP_TO = """
local need = tonumber(ARGV[1])
local out = {}
for _, key in ipairs(KEYS) do
  if need <= 0 then break end
  local got = redis.call('LPOP', key, need)
  if got then
    for _, id in ipairs(got) do out[#out + 1] = id end
    need = need - #got
  end
end
return out
"""


def _pop_up_to(client: redis.Redis, keys: Sequence[str], need: int) -> list[bytes | str]:
    """Up to ``need`` ids from ``keys``, earlier keys first: one round trip for every key
    (a microbatch's fill looks at a model's urgent and routine queues of every tenant)."""
    script = client.register_script(_POP_UP_TO)  # EVALSHA; the script is sent once
    return cast(list[bytes | str], script(keys=list(keys), args=[need]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- rotate -----------------------------------------------------------------------------
class Rotation:
    """The worker's models in this turn's order. Each turn starts with the next model:
    BLPOP serves the first non-empty key it is given, so a fixed order would let a busy
    first model starve the rest. With ``tenants``, each model's queues of every tenant,
    the tenants taking turns the same way, so that one tenant's 100,000 queued tiles
    wait behind another's ten images for at most one microbatch."""

    def __init__(self, queues: Sequence[ModelQueue]) -> None:
        self.queues = list(queues)
        self.turn = 0

    def next(self, tenants: Mapping[str, Sequence[str]] | None = None) -> list[ModelQueue]:
        turn = self.turn
        self.turn += 1
        models = _turned(self.queues, turn)
        if tenants is None:
            return models
        return [
            replace(q, tenant=tenant)
            for q in models
            for tenant in _turned(tenants.get(q.model) or [PUBLIC_TENANT], turn)
        ]


def _turned(items: Sequence[T], turn: int) -> list[T]:
    k = turn % len(items)
    return [*items[k:], *items[:k]]


# --- claim ------------------------------------------------------------------------------
class Batcher:
    """The worker's microbatches: collect one model's ids from the models in rotation,
    then claim them. ``requeue`` pushes ids back onto their queues."""

    def __init__(
        self,
        client: redis.Redis,
        engine: Engine,
        queues: Sequence[ModelQueue],
        *,
        worker_id: str,
        settings: Settings,
        requeue: Callable[[Sequence[jobs.Requeue]], None],
        fast_engine: Engine | None = None,
    ) -> None:
        self.client = client
        # Head starts (worker.head_start): hints read after every queue, so that a worker
        # with queued work takes none; the ids of those it took, before every queue.
        on = settings.head_start
        self.hints = {hint_key(q.model): q.model for q in queues} if on else {}
        self.taken = {taken_key(worker_id, q.model): q.model for q in queues} if on else {}
        self._passed_on = False
        self.engine = engine
        self.fast_engine = fast_engine  # for the usual claim's statement (common.claim)
        self.rotation = Rotation(queues)
        self.worker_id = worker_id
        self.lease_s = settings.lease_s
        self.poll_timeout_s = settings.poll_timeout_s
        self.requeue = requeue
        # The BLPOP that waits for work also bounds how late a due retry is released, and
        # a new tenant's first ids are seen.
        self.refresh_every_s = min(settings.poll_timeout_s, 0.5)
        self._next_refresh = 0.0
        self._tenants: dict[str, list[str]] = {}

    @property
    def queues(self) -> list[ModelQueue]:
        return self.rotation.queues

    def log_serving(self, ahead: int) -> None:
        for q in self.queues:
            log.info(
                "worker %s serving %s (batch<=%d, wait<=%.0fms, %d ahead)",
                self.worker_id,
                q.model,
                q.max_batch,
                q.max_wait_s * 1000,
                ahead,
            )

    def collect(
        self,
        busy: Callable[[], bool] = lambda: True,
        alone: Callable[[str], bool] = lambda _: False,
    ) -> tuple[ModelQueue, list[str]] | Hint | None:
        """Ids of one model, or None when no queue had work within the poll timeout; or,
        when no queue had any, a hint (worker.head_start).
        Every ``refresh_every_s`` (a retry's wait is seconds, not milliseconds), retries
        whose backoff has passed go back on their queues and the tenants with queues
        are read again."""
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_every_s
            dispatch.release_due(self.client)
            self._tenants = {q.model: dispatch.tenants(self.client, q.model) for q in self.queues}
        hints, self._passed_on = ({} if self._passed_on else self.hints), False
        return collect_any(
            self.client,
            self.rotation.next(self._tenants),
            self.poll_timeout_s,
            busy,
            hints=hints,
            alone=alone,
            taken=self.taken,
        )

    def keep(self, hint: Hint, idle: bool) -> bool:
        """Whether to start on ``hint``: only with the model stage ``idle`` (a head start
        would wait behind the batch in it). A busy worker puts it back for an idle one
        (Redis gives it to the worker blocked longest, which may be a busy one's intake),
        and leaves hints out of its next pop so as not to take it back at once."""
        if not idle:
            dispatch.pass_on(self.client, hint_key(hint.model), hint.job_id)
            metrics.HEAD_STARTS.labels(hint.model, "passed_on").inc()
            self._passed_on = True
        return idle

    def claim(self, popped: tuple[ModelQueue, list[str]], *, stopping: bool) -> MicroBatch | None:
        """The popped ids as a claimed microbatch; None if none was still pending."""
        queue, ids = popped
        if stopping:
            self.hand_back(ids)
            return None
        model = queue.model
        started = time.perf_counter()
        token, claimed, left = db_retry(self.lease_s)(claim_jobs)(
            self.engine, ids, self.worker_id, self.lease_s, fast=self.fast_engine
        )
        claim_ms = (time.perf_counter() - started) * 1000.0
        self._to_front(left)
        if not claimed:
            return None
        metrics.BATCH_SIZE.labels(model).observe(len(claimed))
        for job in claimed:
            if job.queue_wait_ms is not None:
                metrics.QUEUE_WAIT_SECONDS.labels(model).observe(job.queue_wait_ms / 1000.0)
        return MicroBatch(model, token, claimed, stages={stages.CLAIM: claim_ms})

    def hand_back(self, ids: Sequence[str]) -> None:
        """Ids popped (or pushed here) that this stopping worker will not start: back on
        their own queues; their jobs are still pending in Postgres."""
        try:
            if ids:
                self.requeue(pending_among(self.engine, ids))
        except (redis.RedisError, OperationalError):
            log.warning("could not hand back %d ids; the sweeper will", len(ids))

    def _to_front(self, left: Sequence[jobs.Requeue]) -> None:
        """Jobs the claim left: a retry still in its backoff back to the delayed set, the
        others to a microbatch of their own, next in line rather than behind the
        backlog. Should Redis fail here they are still pending, and the sweeper finds
        them."""
        try:
            dispatch.requeue(self.client, left, front=True)
        except redis.RedisError:
            log.warning("could not hand back %d jobs; the sweeper will", len(left))
