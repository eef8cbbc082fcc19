"""Which claimed batches take a head start's outcome (worker.head_start): a lone fresh
image job of the same model only, and then its results or its error as they came; where
a hinted job's id goes (to its hint's taker, else its queue), and what a stopping taker
hands back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
from prometheus_client import REGISTRY

from hepato.common import dispatch
from hepato.common.constants import PUBLIC_TENANT, Priority, queue_key, taken_key, taker_key
from hepato.common.jobs import ClaimedJob, JobResult
from hepato.worker.head_start import HeadStarts
from hepato.worker.microbatch import MicroBatch


def job(job_id: uuid.UUID, attempts: int = 1, question: str | None = None) -> ClaimedJob:
    return ClaimedJob(job_id, "key", attempts, 3, question)


def kept(job_id: uuid.UUID, model: str = "m") -> tuple[HeadStarts, MicroBatch]:
    starts = HeadStarts({}, None, fakeredis.FakeRedis(), "w")  # type: ignore[arg-type]
    head = MicroBatch(model, uuid.uuid4(), [job(job_id)], speculative=True)
    head.ready, head.images = [job(job_id)], ["pixels"]  # type: ignore[list-item]
    starts._kept[str(job_id)] = head
    return starts, head


def claimed(*jobs: ClaimedJob, model: str = "m") -> MicroBatch:
    return MicroBatch(model, uuid.uuid4(), list(jobs))


def used() -> float:
    return (
        REGISTRY.get_sample_value("hepato_head_starts_total", {"model": "m", "outcome": "used"})
        or 0.0
    )


def test_a_lone_fresh_job_takes_its_head_start_once() -> None:
    job_id = uuid.uuid4()
    starts, head = kept(job_id)
    assert starts.without([str(job_id), "other"]) == ["other"], "its image is in the head"
    batch = claimed(job(job_id))
    before = used()
    assert starts.adopt(batch)
    assert used() == before + 1, "counted"
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


def test_a_head_start_done_before_its_claim_counts_its_write_from_the_claim() -> None:
    """The head start's call returned while the job was still being claimed: the job's
    ``inferred`` is when its claimed batch took the results, not when the call returned,
    so that ``write`` (inferred → committed) does not count the claim again (with the
    null model, write read 4.5 ms of a 17.9 ms request, and the steps summed past it)."""
    job_id = uuid.uuid4()
    starts, head = kept(job_id)
    batch = claimed(job(job_id))
    starts.adopt(batch)
    head.results, head.infer_ms = [JobResult(job_id, {"boxes": []}, 1, 0.1)], 0.1  # type: ignore[arg-type]
    head.inferred_at = datetime.now(UTC) - timedelta(milliseconds=50)
    taken = datetime.now(UTC)
    assert HeadStarts.reuse(batch)
    assert batch.inferred_at is not None and batch.inferred_at >= taken


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


QUEUE = queue_key("m", Priority.urgent, PUBLIC_TENANT)


def test_a_hinted_id_goes_to_its_takers_list_else_to_its_queue() -> None:
    r = fakeredis.FakeRedis()
    mine = taken_key("w1", "m")
    r.set(taker_key("taken"), mine)
    dispatch.push(r, "m", Priority.urgent, ["taken"], hinted=True)
    dispatch.push(r, "m", Priority.urgent, ["untaken"], hinted=True)
    r.set(taker_key("not-hinted"), mine)
    dispatch.push(r, "m", Priority.urgent, ["not-hinted"])
    assert r.lrange(mine, 0, -1) == [b"taken"] and r.pttl(mine) > 0
    assert r.lrange(QUEUE, 0, -1) == [b"untaken", b"not-hinted"]
    assert not r.exists(taker_key("taken")), "read once"


def test_a_stopping_taker_routes_nothing_more_and_hands_back_what_came() -> None:
    r = fakeredis.FakeRedis()
    starts = HeadStarts({"m": None, "n": None}, None, r, "w1")  # type: ignore[arg-type,dict-item]
    for job_id in ("came", "comes-later"):
        r.set(taker_key(job_id), taken_key("w1", "m"))
        starts._takers.append(job_id)
    dispatch.push(r, "m", Priority.urgent, ["came"], hinted=True)
    assert starts.taken_back() == ["came"]
    assert not r.exists(taken_key("w1", "m"))
    dispatch.push(r, "m", Priority.urgent, ["comes-later"], hinted=True)
    assert r.lrange(QUEUE, 0, -1) == [b"comes-later"], "its taker has stopped: the queue"
