"""gateway.finish_watch's answers: the finished row a worker's wake-up carries becomes the
caller's answer; a plain wake-up, someone else's answer or a message it cannot read
sends the caller to the row in Postgres instead (never a wrong answer)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from hepato.gateway.finish_watch import _answer


def answer_text(job_id: uuid.UUID, **over: object) -> bytes:
    # As Postgres's json_build_object writes the row (common.job_statements.completing).
    fields: dict[str, object] = {
        "id": str(job_id),
        "state": "done",
        "error": None,
        "model": "m",
        "model_version": "1",
        "task": "detect",
        "width": 320,
        "height": 240,
        "result": {"boxes": []},
        "queue_wait_ms": 1.5,
        "inference_ms": 7.25,
        "batch_size": 1,
        "stages": {"upload": 0.4, "claim": 1.0},
        "inferred_at": "2026-12-01T16:00:00.123456+00:00",
        "finished_at": "2026-12-01T16:00:00.125+00:00",
        **over,
    }
    return json.dumps(fields).encode()


def test_the_row_a_wakeup_carries_is_the_answer() -> None:
    job_id = uuid.uuid4()
    job = _answer(job_id, answer_text(job_id))
    assert job is not None
    assert (job.id, job.state, job.width, job.result) == (job_id, "done", 320, {"boxes": []})
    assert job.finished_at == datetime(2026, 12, 1, 16, 0, 0, 125000, tzinfo=UTC)
    assert job.inferred_at is not None and job.inferred_at < job.finished_at


@pytest.mark.parametrize(
    "data",
    [
        b"1",
        b"not json",
        b"[1, 2]",
        answer_text(uuid.uuid4()),  # another job's
        answer_text(uuid.UUID(int=0), finished_at="yesterday"),
        answer_text(uuid.UUID(int=0), unknown_column=1),
    ],
    ids=["plain", "not json", "not an object", "another job", "bad time", "unknown key"],
)
def test_a_wakeup_without_this_jobs_answer_sends_the_caller_to_the_row(data: bytes) -> None:
    assert _answer(uuid.UUID(int=0), data) is None
