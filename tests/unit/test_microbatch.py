"""Forming microbatches, one piece at a time: the collector with a pre-filled queue (as
LitServe tests it) and the rotation across models."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from hepato.common.constants import hint_key, queue_keys, taken_key
from hepato.worker.microbatch import Hint, ModelQueue, Rotation, collect_any, collect_batch

URGENT, ROUTINE = queue_keys("m")


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_full_batch_returns_at_once(r: fakeredis.FakeRedis) -> None:
    r.rpush(ROUTINE, *[f"id{i}" for i in range(20)])
    started = time.monotonic()
    batch = collect_batch(r, [URGENT, ROUTINE], max_batch=8, max_wait_s=5.0, poll_timeout_s=1.0)
    assert batch == [f"id{i}" for i in range(8)]
    assert time.monotonic() - started < 1.0, "a full batch must not wait for max_wait"
    assert r.llen(ROUTINE) == 12


def test_partial_batch_after_max_wait(r: fakeredis.FakeRedis) -> None:
    r.rpush(ROUTINE, "a", "b", "c")
    started = time.monotonic()
    batch = collect_batch(r, [URGENT, ROUTINE], max_batch=8, max_wait_s=0.2, poll_timeout_s=1.0)
    waited = time.monotonic() - started
    assert batch == ["a", "b", "c"]
    assert 0.15 <= waited < 1.0


def test_stragglers_within_max_wait_join(r: fakeredis.FakeRedis) -> None:
    r.rpush(ROUTINE, "first")
    threading.Timer(0.05, lambda: r.rpush(ROUTINE, "late")).start()
    batch = collect_batch(r, [URGENT, ROUTINE], max_batch=4, max_wait_s=0.5, poll_timeout_s=1.0)
    assert batch == ["first", "late"]


def test_empty_queue_returns_nothing_after_poll_timeout(r: fakeredis.FakeRedis) -> None:
    started = time.monotonic()
    assert (
        collect_batch(r, [URGENT, ROUTINE], max_batch=4, max_wait_s=0.1, poll_timeout_s=0.3) == []
    )
    assert time.monotonic() - started >= 0.25


def test_urgent_before_routine(r: fakeredis.FakeRedis) -> None:
    r.rpush(ROUTINE, "r1", "r2", "r3")
    r.rpush(URGENT, "u1", "u2")
    batch = collect_batch(r, [URGENT, ROUTINE], max_batch=3, max_wait_s=0.0, poll_timeout_s=1.0)
    assert batch == ["u1", "u2", "r1"]


def test_zero_wait_takes_only_what_is_there(r: fakeredis.FakeRedis) -> None:
    r.rpush(ROUTINE, "a", "b")
    assert collect_batch(r, [URGENT, ROUTINE], max_batch=8, max_wait_s=0.0, poll_timeout_s=1.0) == [
        "a",
        "b",
    ]


def test_collect_any_keeps_each_batch_to_one_model(r: fakeredis.FakeRedis) -> None:
    a, b = ModelQueue("a", 4, 0.0), ModelQueue("b", 2, 0.0)
    r.rpush(a.keys[1], *[f"a{i}" for i in range(6)])
    r.rpush(b.keys[1], *[f"b{i}" for i in range(6)])
    got = collect_any(r, [a, b], poll_timeout_s=1.0)
    assert got == (a, ["a0", "a1", "a2", "a3"])
    got = collect_any(r, [b, a], poll_timeout_s=1.0)
    assert got == (b, ["b0", "b1"]), "max_batch is the model's own"


def test_collect_any_takes_urgent_of_any_model_first(r: fakeredis.FakeRedis) -> None:
    a, b = ModelQueue("a", 8, 0.0), ModelQueue("b", 8, 0.0)
    r.rpush(a.keys[1], "a-routine")
    r.rpush(b.keys[0], "b-urgent")
    got = collect_any(r, [a, b], poll_timeout_s=1.0)
    assert got is not None and got[0] is b and got[1] == ["b-urgent"]


def test_rotating_the_models_serves_both_when_both_are_busy(r: fakeredis.FakeRedis) -> None:
    a, b = ModelQueue("a", 2, 0.0), ModelQueue("b", 2, 0.0)
    r.rpush(a.keys[1], *[f"a{i}" for i in range(100)])
    r.rpush(b.keys[1], *[f"b{i}" for i in range(100)])
    order = [a, b]
    served = []
    for turn in range(6):
        got = collect_any(r, order[turn % 2 :] + order[: turn % 2], poll_timeout_s=1.0)
        assert got is not None
        served.append(got[0].model)
    assert served == ["a", "b"] * 3


def test_collect_any_returns_none_when_idle(r: fakeredis.FakeRedis) -> None:
    assert collect_any(r, [ModelQueue("a", 2, 0.0)], poll_timeout_s=0.05) is None


def test_a_pre_filled_queue_forms_one_microbatch_per_call(r: fakeredis.FakeRedis) -> None:
    q = ModelQueue("m", 4, 0.0)
    r.rpush(ROUTINE, *[f"id{i}" for i in range(10)])
    batches = [collect_any(r, [q], poll_timeout_s=1.0) for _ in range(3)]
    assert batches == [
        (q, ["id0", "id1", "id2", "id3"]),
        (q, ["id4", "id5", "id6", "id7"]),
        (q, ["id8", "id9"]),
    ]
    assert r.llen(ROUTINE) == 0


def test_a_pre_filled_urgent_queue_tops_up_from_routine(r: fakeredis.FakeRedis) -> None:
    q = ModelQueue("m", 4, 0.0)
    r.rpush(ROUTINE, "r0", "r1", "r2")
    r.rpush(URGENT, "u0", "u1")
    assert collect_any(r, [q], poll_timeout_s=1.0) == (q, ["u0", "u1", "r0", "r1"])


def test_rotation_starts_each_turn_with_the_next_model() -> None:
    a, b, c = ModelQueue("a", 1, 0.0), ModelQueue("b", 1, 0.0), ModelQueue("c", 1, 0.0)
    rotation = Rotation([a, b, c])
    assert [rotation.next() for _ in range(4)] == [[a, b, c], [b, c, a], [c, a, b], [a, b, c]]


def test_a_busy_model_cannot_starve_another(r: fakeredis.FakeRedis) -> None:
    busy, quiet = ModelQueue("busy", 4, 0.0), ModelQueue("quiet", 4, 0.0)
    r.rpush(busy.keys[1], *[f"b{i}" for i in range(400)])
    r.rpush(quiet.keys[1], "q0", "q1")
    rotation = Rotation([busy, quiet])
    served = []
    for _ in range(2):
        got = collect_any(r, rotation.next(), poll_timeout_s=1.0)
        assert got is not None
        served.append(got[0].model)
    assert served == ["busy", "quiet"], "the quiet model waits one turn, not for the backlog"
    assert r.llen(quiet.keys[1]) == 0


def test_urgent_of_any_model_before_routine_of_any_in_every_turn(
    r: fakeredis.FakeRedis,
) -> None:
    a, b = ModelQueue("a", 2, 0.0), ModelQueue("b", 2, 0.0)
    r.rpush(a.keys[1], *[f"a-routine{i}" for i in range(4)])
    r.rpush(b.keys[1], *[f"b-routine{i}" for i in range(4)])
    r.rpush(b.keys[0], "b-urgent0", "b-urgent1", "b-urgent2")
    rotation = Rotation([a, b])
    got = [collect_any(r, rotation.next(), poll_timeout_s=1.0) for _ in range(4)]
    assert got == [
        (b, ["b-urgent0", "b-urgent1"]),
        (b, ["b-urgent2", "b-routine0"]),
        (a, ["a-routine0", "a-routine1"]),
        (b, ["b-routine1", "b-routine2"]),
    ]


class CountingRedis(fakeredis.FakeRedis):
    """Counts the blocking pops: a straggler wait is a BLPOP after the first."""

    blpops = 0

    def blpop(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.blpops += 1
        return super().blpop(*args, **kwargs)


def test_idle_model_takes_a_lone_job_without_a_straggler_wait() -> None:
    r = CountingRedis()
    r.rpush(URGENT, "lone")
    batch = collect_batch(
        r, [URGENT, ROUTINE], max_batch=8, max_wait_s=60.0, poll_timeout_s=1.0, busy=lambda: False
    )
    assert batch == ["lone"]
    assert r.blpops == 1, "the only BLPOP is the one that found the job"


def test_idle_model_still_takes_what_is_already_queued() -> None:
    r = CountingRedis()
    r.rpush(ROUTINE, "a", "b", "c")
    batch = collect_batch(
        r, [URGENT, ROUTINE], max_batch=8, max_wait_s=60.0, poll_timeout_s=1.0, busy=lambda: False
    )
    assert batch == ["a", "b", "c"]
    assert r.blpops == 1


def test_busy_model_waits_for_stragglers_until_it_frees() -> None:
    r = CountingRedis()
    r.rpush(URGENT, "first")
    threading.Timer(0.05, lambda: r.rpush(URGENT, "late")).start()
    batch = collect_batch(
        r, [URGENT, ROUTINE], max_batch=4, max_wait_s=0.5, poll_timeout_s=1.0, busy=lambda: True
    )
    assert batch == ["first", "late"]


def test_a_fill_stops_waiting_for_stragglers_once_the_model_frees() -> None:
    """Polled, not a BLPOP for the rest of max_wait: that slept through the model's end
    (and on a real, idle Redis its short timeouts fire only at Redis's 100 ms tick)."""
    r = CountingRedis()
    r.rpush(URGENT, "first")
    looks = iter([True, True, False])
    started = time.monotonic()
    batch = collect_batch(
        r,
        [URGENT, ROUTINE],
        max_batch=4,
        max_wait_s=30.0,
        poll_timeout_s=1.0,
        busy=lambda: next(looks, False),
    )
    assert batch == ["first"]
    assert time.monotonic() - started < 10.0, "the wait ended when the model freed"
    assert r.blpops == 1, "no blocking pop for stragglers"


def test_a_hint_is_taken_only_when_no_queue_has_work() -> None:
    r = CountingRedis()
    hints = {hint_key("m"): "m"}
    r.rpush(hint_key("m"), "announced")
    r.rpush(ROUTINE, "queued")
    got = collect_any(r, [ModelQueue("m", 8, 0.0)], 1.0, hints=hints)
    assert got is not None and not isinstance(got, Hint) and got[1] == ["queued"]
    assert collect_any(r, [ModelQueue("m", 8, 0.0)], 1.0, hints=hints) == Hint("m", "announced")
    r.rpush(hint_key("m"), "unheard")
    assert collect_any(r, [ModelQueue("m", 8, 0.0)], 0.01) is None, "no hints asked for"


def test_collect_any_passes_the_busy_signal_on() -> None:
    r = CountingRedis()
    r.rpush(URGENT, "lone")
    got = collect_any(r, [ModelQueue("m", 8, 60.0)], 1.0, busy=lambda: False)
    assert got is not None and got[1] == ["lone"]
    assert r.blpops == 1


def test_a_fill_takes_every_key_in_one_round_trip(
    r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Urgent, then routine, of every tenant: one script call, no LPOP per key."""
    r.rpush(URGENT, "u1")
    r.rpush(ROUTINE, "r1", "r2", "r3")
    other_urgent, other_routine = queue_keys("m", "lab-b")
    r.rpush(other_routine, "b1")
    calls: list[str] = []
    real = r.execute_command

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(r, "execute_command", counted)
    keys = [URGENT, other_urgent, ROUTINE, other_routine]
    batch = collect_batch(r, keys, max_batch=4, max_wait_s=0.0, poll_timeout_s=1.0)
    assert batch == ["u1", "r1", "r2", "r3"]
    assert "LPOP" not in calls  # the first call also loads the script
    assert r.lrange(other_routine, 0, -1) == [b"b1"]
    r.rpush(ROUTINE, "r4")
    calls.clear()
    assert collect_batch(r, keys, 4, 0.0, 1.0) == ["r4", "b1"]
    assert calls == ["BLPOP", "EVALSHA"]


def test_a_first_id_with_a_head_start_is_claimed_alone() -> None:
    """Only a lone job takes a head start: the ids behind it wait for the next batch."""
    r = CountingRedis()
    r.rpush(URGENT, "announced", "next", "after")
    queue = ModelQueue("m", 8, 0.0)
    assert collect_any(r, [queue], 1.0, alone=lambda i: i == "announced") == (queue, ["announced"])
    assert collect_any(r, [queue], 1.0, alone=lambda i: i == "announced") == (
        queue,
        ["next", "after"],
    )


def test_an_id_pushed_for_this_workers_head_start_goes_before_every_queue_alone() -> None:
    r = CountingRedis()
    mine = taken_key("me", "m")
    r.rpush(URGENT, "u1", "u2")
    r.rpush(mine, "head-started")
    r.rpush(hint_key("m"), "announced")
    queue = ModelQueue("m", 8, 0.0)
    taken, hints = {mine: "m"}, {hint_key("m"): "m"}
    assert collect_any(r, [queue], 1.0, hints=hints, taken=taken) == (queue, ["head-started"])
    assert collect_any(r, [queue], 1.0, hints=hints, taken=taken) == (queue, ["u1", "u2"])


def test_a_busy_worker_puts_a_hint_back_for_an_idle_one_and_skips_hints_once() -> None:
    from prometheus_client import REGISTRY

    from hepato.common.settings import Settings
    from hepato.worker.microbatch import Batcher

    r = fakeredis.FakeRedis()
    batcher = Batcher(
        r,
        None,  # type: ignore[arg-type]
        [ModelQueue("m", 8, 0.0)],
        worker_id="busy",
        settings=Settings(poll_timeout_s=0.05),
        requeue=lambda _: None,
    )
    r.rpush(hint_key("m"), "announced")
    hint = batcher.collect()
    assert hint == Hint("m", "announced")
    passed = {"model": "m", "outcome": "passed_on"}
    before = REGISTRY.get_sample_value("hepato_head_starts_total", passed) or 0.0
    assert not batcher.keep(hint, idle=False)
    assert REGISTRY.get_sample_value("hepato_head_starts_total", passed) == before + 1
    assert r.lrange(hint_key("m"), 0, -1) == [b"announced"] and r.pttl(hint_key("m")) > 0
    assert batcher.collect() is None, "not taken back by the worker that put it back"
    again = batcher.collect()
    assert again == hint and batcher.keep(again, idle=True)
    assert not r.exists(hint_key("m")), "kept: not put back"
