"""The model stage's time-bounded call (worker.inference.with_timeout): its thread is
kept between calls, and a hung call's thread is abandoned, never reused."""

from __future__ import annotations

import itertools
import threading

import pytest

from hepato.worker.inference import ModelTimeout, with_timeout

# Thread idents are reused once a thread ends: a thread is told apart by a mark of its own.
_mine = threading.local()
_marks = itertools.count()


def mark() -> int:
    if not hasattr(_mine, "mark"):
        _mine.mark = next(_marks)
    return int(_mine.mark)


def test_calls_in_turn_run_on_one_kept_thread() -> None:
    first = with_timeout(mark, 5.0)
    assert with_timeout(mark, 5.0) == first
    assert first != mark()


def test_a_failing_call_raises_its_error_and_keeps_its_thread() -> None:
    def fails() -> None:
        raise ValueError("bad input")

    thread = with_timeout(mark, 5.0)
    with pytest.raises(ValueError, match="bad input"):
        with_timeout(fails, 5.0)
    assert with_timeout(mark, 5.0) == thread


def test_a_hung_call_times_out_and_its_thread_is_never_reused() -> None:
    release = threading.Event()
    hung: list[int] = []

    def hangs() -> str:
        hung.append(mark())
        release.wait(10)
        return "late"

    with pytest.raises(ModelTimeout, match=r"longer than 0\.2s"):
        with_timeout(hangs, 0.2)
    try:
        # The next calls run elsewhere, while the hung one still holds its thread.
        assert with_timeout(mark, 5.0) != hung[0]
        assert with_timeout(lambda: "next", 5.0) == "next"
    finally:
        release.set()
    assert with_timeout(mark, 5.0) != hung[0]
