"""A microbatch holding a job tried before runs with nothing else in the worker's hands:
its model call waits for every earlier write, and intake claims nothing more until it has
returned (worker.pipeline.Quarantine)."""

from __future__ import annotations

import threading
import time

from hepato.worker.pipeline import Quarantine

FRESH, SUSPECT = [1, 1, 1], [2]


def _in_thread(fn: object) -> threading.Thread:
    t = threading.Thread(target=fn)  # type: ignore[arg-type]
    t.start()
    return t


def test_fresh_batches_never_wait() -> None:
    q = Quarantine(threading.Event(), tick_s=0.01)
    q.to_write()
    q.handing_on(FRESH)
    q.before_model(FRESH)  # returns at once although a write is pending
    q.wait_to_claim()


def test_a_suspect_model_call_waits_for_the_earlier_writes() -> None:
    q = Quarantine(threading.Event(), tick_s=0.01)
    q.to_write()
    started = threading.Event()
    t = _in_thread(lambda: (q.before_model(SUSPECT), started.set()))
    time.sleep(0.1)
    assert not started.is_set(), "ran while an earlier batch was unwritten"
    q.written()
    t.join(timeout=2)
    assert started.is_set()


def test_intake_claims_nothing_while_a_suspect_is_in_hand() -> None:
    q = Quarantine(threading.Event(), tick_s=0.01)
    q.handing_on(SUSPECT)
    claimed = threading.Event()
    t = _in_thread(lambda: (q.wait_to_claim(), claimed.set()))
    time.sleep(0.1)
    assert not claimed.is_set(), "claimed while a suspect batch was on its way to the model"
    q.before_model(SUSPECT)
    q.after_model(SUSPECT)
    t.join(timeout=2)
    assert claimed.is_set()


def test_abort_releases_every_wait() -> None:
    abort = threading.Event()
    q = Quarantine(abort, tick_s=0.01)
    q.to_write()
    q.handing_on(SUSPECT)
    waits = [_in_thread(q.wait_to_claim), _in_thread(lambda: q.before_model(SUSPECT))]
    abort.set()
    for t in waits:
        t.join(timeout=2)
        assert not t.is_alive()
