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
A worker takes hints only for the models it serves alone (worker.microbatch ``Batcher``):
with several idle workers, the hint and the job's id would go to two of them."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from hepato.common import stages
from hepato.common.jobs import ClaimedJob
from hepato.worker import inference
from hepato.worker.backends.base import Model
from hepato.worker.microbatch import Hint, MicroBatch
from hepato.worker.prepare import Preparer, place_outcome

# Head starts kept for their claim: a hint taken long after its job was claimed elsewhere
# is never asked for, and goes once this many newer ones came.
KEPT = 4


class HeadStarts:
    def __init__(self, models: Mapping[str, Model], prepare: Preparer) -> None:
        self.models = models
        self.prepare = prepare
        self._kept: OrderedDict[str, MicroBatch] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, hint: Hint) -> MicroBatch | None:
        """The hinted image, decoded (and pre-processed for a model with phases), as a
        speculative microbatch for the model stage; None if its image is gone (taken by
        a worker that popped the job first) or undecodable (its claim will say so)."""
        model = self.models.get(hint.model)
        if model is None:
            return None
        outcome = self.prepare.take_and_decode([hint.job_id]).get(hint.job_id)
        if outcome is None:
            return None
        job = ClaimedJob(uuid.UUID(hint.job_id), "", attempts=1, max_attempts=1, question=None)
        batch = MicroBatch(hint.model, uuid.uuid4(), [job], speculative=True)
        batch.fetched_at = datetime.now(UTC)
        place_outcome(batch, job, outcome)
        if not batch.ready:
            return None
        if inference.phases(model):
            batch.prepared = inference.prepare(model, batch.ready, batch.images)
        with self._lock:
            self._kept[hint.job_id] = batch
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        return batch

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
        return True

    @staticmethod
    def reuse(batch: MicroBatch) -> bool:
        """In the model stage: the outcome of the batch's head start, its results or the
        error the model raised (as the batch's own call would have met it: the same model
        on the same pixels); False if it has none (the batch runs the model itself)."""
        head = batch.head
        if head is None or not (head.results or head.raws is not None or head.transient):
            return False
        batch.raws, batch.infer_ms, batch.inferred_at = head.raws, head.infer_ms, head.inferred_at
        batch.results, batch.transient = list(head.results), dict(head.transient)
        # What of the call ran before this batch came: all of it but the batch's wait for it.
        ran = head.results[0].inference_ms if head.results else head.infer_ms
        batch.stages[stages.HEAD_START] = max(0.0, ran - batch.stages.get(stages.TO_MODEL, 0.0))
        return True
