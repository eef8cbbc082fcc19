"""The batch collector on its own, with a pre-filled queue (as LitServe tests it)."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from common.constants import queue_keys
from common.queue import collect_batch

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
