"""The plumbing between the worker's stages: the bounded hand-offs between them, and one
thread that keeps every claimed job's lease. What travels through them, a
``MicroBatch``, is formed in worker.microbatch."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Closed(Exception):
    """The hand-off was shut: the stage reading it has nothing more to do."""


class Handoff(Generic[T]):
    """A bounded queue from one stage to the next. The producer closes it when done;
    every wait also gives up when ``abort`` is set, so no stage can hang on a dead peer."""

    def __init__(self, size: int, abort: threading.Event, tick_s: float = 0.2) -> None:
        self._queue: queue.Queue[T | _End] = queue.Queue(maxsize=size)
        self._abort = abort
        self._tick_s = tick_s

    def put(self, item: T) -> None:
        self._put(item)

    def close(self) -> None:
        self._put(_END)

    def get(self) -> T:
        """The next item; raises Closed after the last one, or once aborted."""
        while not self._abort.is_set():
            try:
                item = self._queue.get(timeout=self._tick_s)
            except queue.Empty:
                continue
            if isinstance(item, _End):
                raise Closed
            return item
        raise Closed

    def _put(self, item: T | _End) -> None:
        while not self._abort.is_set():
            try:
                self._queue.put(item, timeout=self._tick_s)
                return
            except queue.Full:
                continue
        raise Closed


class _End:
    pass


_END = _End()


class Occupancy:
    """How many microbatches a stage holds (handed to it and not yet through it), those
    that are not ``counted`` left out (a head start: the job it runs for is not claimed
    yet, and its claim should not wait for stragglers behind it)."""

    def __init__(self) -> None:
        self._count = 0
        self._uncounted = 0
        self._lock = threading.Lock()

    def enter(self, counted: bool = True) -> None:
        with self._lock:
            self._count += counted
            self._uncounted += not counted

    def leave(self, counted: bool = True) -> None:
        with self._lock:
            self._count -= counted
            self._uncounted -= not counted

    def idle(self) -> bool:
        """Holding nothing, counted or not."""
        return self._count == 0 and self._uncounted == 0

    def busy(self) -> bool:
        return self._count > 0


class LeaseKeeper:
    """Extends the leases of every microbatch the worker holds, from claim to write, in
    one thread: with stages overlapping, several batches are held at once."""

    def __init__(self, every_s: float, extend: Callable[[uuid.UUID, list[uuid.UUID]], object]):
        self._every_s = every_s
        self._extend = extend
        # key -> (token, ids): a microbatch is held under its token; a slide's plan job,
        # which outlives its microbatch in the planner, under a key of its own.
        self._held: dict[object, tuple[uuid.UUID, list[uuid.UUID]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def hold(self, token: uuid.UUID, ids: list[uuid.UUID], key: object = None) -> None:
        with self._lock:
            self._held[token if key is None else key] = (token, ids)

    def drop(self, key: object) -> None:
        with self._lock:
            self._held.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            with self._lock:
                held = list(self._held.values())
            for token, ids in held:
                try:
                    self._extend(token, ids)
                except Exception:
                    log.warning("could not extend leases", exc_info=True)


class Quarantine:
    """Runs a microbatch that holds a job tried before with nothing else in the worker's
    hands. Such a job may be what killed the last worker that held it (a segfault, the
    OOM killer: a dead process names no culprit), and a death loses every batch the
    worker holds unwritten. So its model call waits until every earlier batch is written,
    and intake claims nothing more until that call has returned: a poison job's death then
    costs no other job an attempt."""

    def __init__(self, abort: threading.Event, tick_s: float = 0.2) -> None:
        self._cond = threading.Condition()
        self._abort = abort
        self._tick_s = tick_s
        self._unwritten = 0
        self._suspect_in_hand = False

    @staticmethod
    def suspect(attempts: list[int]) -> bool:
        return any(n > 1 for n in attempts)

    def wait_to_claim(self) -> None:
        """Intake, before it claims: not while a suspect batch is on its way to the model."""
        with self._cond:
            while self._suspect_in_hand and not self._abort.is_set():
                self._cond.wait(self._tick_s)

    def handing_on(self, attempts: list[int]) -> None:
        """Intake, right before it hands a batch to the model stage."""
        if self.suspect(attempts):
            with self._cond:
                self._suspect_in_hand = True

    def before_model(self, attempts: list[int]) -> None:
        """The model stage: a suspect batch waits until every earlier batch is written."""
        if self.suspect(attempts):
            with self._cond:
                while self._unwritten and not self._abort.is_set():
                    self._cond.wait(self._tick_s)

    def after_model(self, attempts: list[int]) -> None:
        if self.suspect(attempts):
            with self._cond:
                self._suspect_in_hand = False
                self._cond.notify_all()

    def to_write(self) -> None:
        with self._cond:
            self._unwritten += 1

    def written(self) -> None:
        with self._cond:
            self._unwritten -= 1
            self._cond.notify_all()
