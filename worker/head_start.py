"""Head starts: an idle worker runs the model on a lone real-time image while the gateway
is still storing and committing its job (issue 15).

The gateway announces a lone image whose caller waits (common.dispatch ``hint``: its
bytes inline and its id on the model's hint key) before its PUT and its insert, which on
the bench VM take 7 ms, and the push, pop and claim 4 more. A worker whose model stage is
idle takes the hint after every queue (worker.microbatch), decodes the image and hands
it to the model stage as a microbatch of its own, marked ``speculative``: no lease, no
write. Intake goes back to the queues meanwhile, so the job's claim overlaps the model
call. When it claims that job (fresh, alone in its microbatch), the claimed batch takes
the head start's pixels and, in the model stage, its results; the model stage is one
thread fed in order, so the head start has run by then. The results are written as any
others, fenced by the claim's lease token.

What is never done: a write for a job this worker has not claimed (a head start whose
job is refused, or claimed by another worker, is dropped unused), a question asked (the
gateway hints only at question-less jobs), a head start used for a job tried before (its
attempt may be a poison's: the quarantine runs it again). A poison image that kills the
worker during its head start costs that death but no attempt; its job then runs as usual.

With several idle workers, the hint and the job's id would go to two of them (Redis hands
each to the one blocked longest): every head start wasted. So the taker names a list of
its own on the job (``taker_key``) before it starts, and the gateway's push sends the id
there instead of to its queue (common.dispatch ``push``); the taker reads that list
before its queues. Should it die, the id waits there until the sweeper finds the job
missing from its queue and pushes it again (common.lost_ids); a stopping worker first
removes its taker keys, then hands back what its lists hold (``taken_back``)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import redis

from hepato.common import dispatch, metrics, stages
from hepato.common.constants import taken_key
from hepato.common.jobs import ClaimedJob
from hepato.worker import inference
from hepato.worker.backends.base import Model
from hepato.worker.microbatch import Hint, MicroBatch
from hepato.worker.prepare import Preparer, place_outcome

log = logging.getLogger(__name__)

# Head starts kept for their claim: one whose job never came (refused, or pushed to the
# queue after its taker key expired) is never asked for, and goes once this many newer
# ones came.
KEPT = 4
# Taker keys a stopping worker removes: more than it can set within TAKER_TTL_MS (one
# per model call).
REMEMBERED = 4096


class HeadStarts:
    def __init__(
        self, models: Mapping[str, Model], prepare: Preparer, client: redis.Redis, worker_id: str
    ) -> None:
        self.models = models
        self.prepare = prepare
        self.client = client
        self.worker_id = worker_id
        self._kept: OrderedDict[str, MicroBatch] = OrderedDict()
        self._lock = threading.Lock()
        self._takers: deque[str] = deque(maxlen=REMEMBERED)

    def start(self, hint: Hint) -> MicroBatch | None:
        """The hinted image, decoded (and pre-processed for a model with phases), as a
        speculative microbatch for the model stage; None if its image is gone (taken by
        a worker that popped the job first) or undecodable (its claim will say so)."""
        model = self.models.get(hint.model)
        if model is None:
            return None
        # The job's id comes here only if the taker key is set when its gateway pushes it.
        mine = taken_key(self.worker_id, hint.model)
        data = dispatch.take_hinted(self.client, hint.job_id, mine)
        self._takers.append(hint.job_id)
        outcome = self.prepare.decode_taken({hint.job_id: data}).get(hint.job_id) if data else None
        if outcome is None:
            metrics.HEAD_STARTS.labels(hint.model, "void").inc()
            return None
        job = ClaimedJob(uuid.UUID(hint.job_id), "", attempts=1, max_attempts=1, question=None)
        batch = MicroBatch(hint.model, uuid.uuid4(), [job], speculative=True)
        batch.fetched_at = datetime.now(UTC)
        place_outcome(batch, job, outcome)
        if not batch.ready:
            metrics.HEAD_STARTS.labels(hint.model, "void").inc()
            return None
        metrics.HEAD_STARTS.labels(hint.model, "started").inc()
        if inference.phases(model):
            batch.prepared = inference.prepare(model, batch.ready, batch.images)
        with self._lock:
            self._kept[hint.job_id] = batch
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        return batch

    def taken_back(self) -> list[str]:
        """On stop, once intake has ended: no more ids routed here (the taker keys go
        first; a push reads its key and pushes in one step), then the ids already pushed
        here, taken off this worker's lists for the caller to hand back. Should Redis
        fail, the sweeper finds them."""
        lists = [taken_key(self.worker_id, model) for model in self.models]
        try:
            return dispatch.untake(self.client, self._takers, lists)
        except redis.RedisError:
            log.warning("could not hand back the ids pushed for head starts; the sweeper will")
            return []

    def has(self, job_id: str) -> bool:
        """Whether ``job_id`` has a head start: its microbatch is then claimed alone (the
        ids after it wait for the next), since only a lone job takes a head start."""
        return job_id in self._kept

    def without(self, ids: Iterable[str]) -> list[str]:
        """``ids`` less those with a head start (their image is in it, not in Redis)."""
        with self._lock:
            return [i for i in ids if i not in self._kept]

    def adopt(self, batch: MicroBatch) -> bool:
        """After the claim: a lone fresh image job with a head start takes its pixels (the
        model stage then takes its results: ``reuse``). False: prepare it as usual."""
        if len(batch.claimed) != 1:
            return False
        job = batch.claimed[0]
        with self._lock:
            head = self._kept.pop(str(job.id), None)
        if head is None or head.model != batch.model:
            return False
        if job.attempts != 1 or job.kind != "image" or job.question:
            return False
        batch.ready, batch.images, batch.prepared = [job], head.images, head.prepared
        batch.fetched_at, batch.head = head.fetched_at, head
        metrics.HEAD_STARTS.labels(batch.model, "used").inc()
        return True

    @staticmethod
    def reuse(batch: MicroBatch) -> bool:
        """In the model stage: the outcome of the batch's head start, its results or the
        error the model raised (as the batch's own call would have met it: the same model
        on the same pixels); False if it has none (the batch runs the model itself)."""
        head = batch.head
        if head is None or not (head.results or head.raws is not None or head.transient):
            return False
        # Inferred when this batch took the results: a call that returned before the
        # claim was done would otherwise put the claim in the write's time too.
        batch.raws, batch.infer_ms, batch.inferred_at = head.raws, head.infer_ms, datetime.now(UTC)
        batch.results, batch.transient = list(head.results), dict(head.transient)
        # What of the call ran before this batch came: all of it but the batch's wait for it.
        ran = head.results[0].inference_ms if head.results else head.infer_ms
        batch.stages[stages.HEAD_START] = max(0.0, ran - batch.stages.get(stages.TO_MODEL, 0.0))
        return True
