"""Which claimed batches take a head start's outcome (worker.head_start): a lone fresh
image job of the same model only, and then its results or its error as they came."""

from __future__ import annotations

import uuid
from typing import Any

from hepato.common.jobs import ClaimedJob, JobResult
from hepato.worker.head_start import HeadStarts
from hepato.worker.microbatch import MicroBatch


def job(job_id: uuid.UUID, attempts: int = 1, question: str | None = None) -> ClaimedJob:
    return ClaimedJob(job_id, "key", attempts, 3, question)


def kept(job_id: uuid.UUID, model: str = "m") -> tuple[HeadStarts, MicroBatch]:
    starts = HeadStarts({}, None)  # type: ignore[arg-type]
    head = MicroBatch(model, uuid.uuid4(), [job(job_id)], speculative=True)
    head.ready, head.images = [job(job_id)], ["pixels"]  # type: ignore[list-item]
    starts._kept[str(job_id)] = head
    return starts, head


def claimed(*jobs: ClaimedJob, model: str = "m") -> MicroBatch:
    return MicroBatch(model, uuid.uuid4(), list(jobs))


def test_a_lone_fresh_job_takes_its_head_start_once() -> None:
    job_id = uuid.uuid4()
    starts, head = kept(job_id)
    assert starts.without([str(job_id), "other"]) == ["other"], "its image is in the head"
    batch = claimed(job(job_id))
    assert starts.adopt(batch)
    assert batch.head is head and batch.images == ["pixels"] and batch.ready == batch.claimed
    assert not starts.adopt(claimed(job(job_id))), "taken once"


def test_a_job_tried_before_or_asked_a_question_or_not_alone_runs_as_usual() -> None:
    job_id = uuid.uuid4()
    cases: list[Any] = [
        claimed(job(job_id, attempts=2)),
        claimed(job(job_id, question="fibrosis?")),
        claimed(job(job_id), model="other"),
        claimed(job(job_id), job(uuid.uuid4())),
    ]
    for batch in cases:
        starts, _ = kept(job_id)
        assert not starts.adopt(batch)
        assert batch.head is None and batch.images == []


def test_the_model_stage_takes_the_head_starts_results_or_its_error() -> None:
    job_id = uuid.uuid4()
    starts, head = kept(job_id)
    batch = claimed(job(job_id))
    starts.adopt(batch)
    assert not HeadStarts.reuse(batch), "it has not run: the batch runs the model itself"
    found = JobResult(job_id, {"boxes": []}, 1, 7.0)  # type: ignore[arg-type]
    head.results, head.infer_ms = [found], 7.0
    assert HeadStarts.reuse(batch)
    assert batch.results == head.results and batch.infer_ms == 7.0
    head.results, head.transient = [], {job_id: "the model failed on this image"}
    assert HeadStarts.reuse(batch)
    assert batch.results == [] and batch.transient == head.transient


def test_a_kept_head_start_is_known_until_taken() -> None:
    job_id = uuid.uuid4()
    starts, _ = kept(job_id)
    assert starts.has(str(job_id)) and not starts.has(str(uuid.uuid4()))
    starts.adopt(claimed(job(job_id)))
    assert not starts.has(str(job_id))


def test_a_head_start_on_the_model_is_not_busy_but_not_idle() -> None:
    """A claim behind a head start waits for no stragglers (not busy); no second hint is
    taken while one runs (not idle)."""
    from hepato.worker.pipeline import Occupancy

    stage = Occupancy()
    stage.enter(counted=False)
    assert not stage.busy() and not stage.idle()
    stage.leave(counted=False)
    assert stage.idle()
