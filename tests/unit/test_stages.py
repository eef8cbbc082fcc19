"""A job's steps in order (common.stages): the recorded ones, those from its own
columns, and what no step accounts for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hepato.common import stages


def test_steps_come_in_order_with_the_job_columns_and_the_rest() -> None:
    inferred = datetime(2026, 11, 30, tzinfo=UTC)
    got = stages.breakdown(
        {"postprocess": 2.0, "upload": 5.0, "to_write": 1.0, "decode": 3.0, "claim": 4.0},
        queue_ms=10.0,
        inference_ms=20.0,
        inferred_at=inferred,
        finished_at=inferred + timedelta(milliseconds=7),
        latency_ms=60.0,
    )
    assert list(got) == [
        "upload",
        "queue",
        "claim",
        "decode",
        "inference",
        "to_write",
        "postprocess",
        "write",
        "other",
    ]
    assert got["write"] == 4.0, "inferred → committed, less the wait and post-processing"
    assert got["other"] == 60.0 - (5 + 10 + 4 + 3 + 20 + 1 + 2 + 4)


def test_a_job_not_run_has_only_what_it_reached() -> None:
    assert stages.breakdown(
        {"upload": 1.04}, queue_ms=None, inference_ms=None, inferred_at=None, finished_at=None
    ) == {"upload": 1.0}
    assert (
        stages.breakdown(None, queue_ms=None, inference_ms=None, inferred_at=None, finished_at=None)
        == {}
    )


def test_clocks_apart_never_give_a_negative_step() -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    got = stages.breakdown(
        {"postprocess": 9.0},
        queue_ms=1.0,
        inference_ms=1.0,
        inferred_at=now,
        finished_at=now - timedelta(milliseconds=3),
        latency_ms=1.0,
    )
    assert got["write"] == 0.0 and got["other"] == 0.0


def test_a_head_start_is_shown_but_not_counted_twice() -> None:
    """The model ran while the job was queued and claimed (head_start), and the claimed
    job then waited for the rest of that call (to_model): the whole of inference
    overlapped other steps, so other is the latency less every step but those two. (It
    was the latency less the steps plus head_start, which counted to_model twice: the
    bench's stages summed above the client's latency.)"""
    got = stages.breakdown(
        {"claim": 2.0, "head_start": 6.0, "to_model": 4.0},
        queue_ms=8.0,
        inference_ms=10.0,
        inferred_at=None,
        finished_at=None,
        latency_ms=21.0,
    )
    assert list(got) == ["queue", "claim", "head_start", "to_model", "inference", "other"]
    assert got["other"] == 21.0 - (8.0 + 2.0 + 4.0)
    assert stages.total(got) == 21.0
    # Without a head start every step adds up.
    assert stages.total({"queue": 8.0, "to_model": 4.0, "inference": 10.0}) == 22.0
