"""The hand-offs and the lease keeper between the worker's stages, without services."""

from __future__ import annotations

import threading
import uuid

import pytest

from hepato.worker.pipeline import Closed, Handoff, LeaseKeeper


def test_items_come_out_in_order_then_closed() -> None:
    h: Handoff[int] = Handoff(3, threading.Event())
    for i in range(3):
        h.put(i)
    got = [h.get() for _ in range(3)]
    h.close()
    assert got == [0, 1, 2]
    with pytest.raises(Closed):
        h.get()


def test_a_full_handoff_blocks_until_the_next_stage_takes() -> None:
    h: Handoff[int] = Handoff(1, threading.Event(), tick_s=0.01)
    h.put(1)
    second = threading.Thread(target=h.put, args=(2,))
    second.start()
    second.join(0.1)
    assert second.is_alive(), "bounded: the producer waits for room"
    assert h.get() == 1
    second.join(5)
    assert not second.is_alive() and h.get() == 2


def test_abort_frees_a_producer_blocked_on_a_dead_consumer() -> None:
    abort = threading.Event()
    h: Handoff[int] = Handoff(1, abort, tick_s=0.01)
    h.put(1)
    outcome: list[str] = []

    def produce() -> None:
        try:
            h.put(2)
        except Closed:
            outcome.append("closed")

    producer = threading.Thread(target=produce)
    producer.start()
    abort.set()
    producer.join(5)
    assert outcome == ["closed"]
    with pytest.raises(Closed):
        h.get()


def test_lease_keeper_extends_what_is_held_until_dropped() -> None:
    extended: list[uuid.UUID] = []
    seen_twice = threading.Event()

    def extend(token: uuid.UUID, ids: list[uuid.UUID]) -> None:
        extended.append(token)
        if extended.count(token) >= 2:
            seen_twice.set()

    keeper = LeaseKeeper(0.01, extend)
    a, b = uuid.uuid4(), uuid.uuid4()
    keeper.hold(a, [uuid.uuid4()])
    keeper.start()
    try:
        assert seen_twice.wait(5)
        keeper.drop(a)
        keeper.hold(b, [])
        seen_twice.clear()
        assert seen_twice.wait(5)
        # A round that began before the drop may still extend a once, but never after b.
        after_b = extended[extended.index(b) :]
        assert a not in after_b and after_b.count(b) >= 2
    finally:
        keeper.stop()
