"""Keeps the local stack serving when one of its apps dies, as compose's
``restart: unless-stopped`` does for the gateway and workers in docker-compose.yml.

An app (gateway or worker) that exits while the stack runs is started again with the
same command and environment, after a delay that doubles with each quick death (1 s,
2 s, 4 s … at most 30 s; back to 1 s once a run lasted a minute), and the console says
so. A dead worker's jobs are not lost meanwhile: their leases expire and any worker's
sweeper, the new one's included, puts them back on the queue. A data service (Postgres,
Redis, SeaweedFS) that dies is not restarted: the supervisor reports it as fatal, since a
Redis restarted empty or a store restarted mid-write is a fault to look at, not hide."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hepato.devstack.localstack import LocalStack

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
# A run this long counts as healthy: the next death starts the backoff over.
STABLE_AFTER_S = 60.0
POLL_S = 0.2


@dataclass
class _Restart:
    due: float
    count: int


class Supervisor:
    """Watches ``stack.apps`` and ``stack.procs`` from a thread of its own, between
    :meth:`start` and :meth:`stop`; ``say`` gets one line per exit and restart."""

    def __init__(
        self,
        stack: LocalStack,
        say: Callable[[str], None],
        *,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.stack = stack
        self.say = say
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.stable_after_s = stable_after_s
        # Set, with its reason, when a data service died: the stack cannot serve.
        self.fatal: str | None = None
        self.restarts: dict[str, int] = {}
        self._started_at: dict[str, float] = {}
        self._quick_deaths: dict[str, int] = {}
        self._pending: dict[str, _Restart] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        now = time.monotonic()
        self._started_at = {name: now for name, _ in self.stack.apps}
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching before the stack stops its processes, so that none of the
        exits a shutdown causes is taken for a crash and restarted."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S):
            self.check()

    def check(self) -> None:
        """One pass: note every exit, restart what is due."""
        now = time.monotonic()
        for name, proc in list(self.stack.apps):
            if name in self._pending or proc.poll() is None:
                continue
            # A SIGKILLed worker's decoder processes outlive it; they hold nothing
            # the new worker needs, so they go with it.
            self.stack.reap_group(proc)
            ran_s = now - self._started_at.get(name, now)
            quick = 0 if ran_s >= self.stable_after_s else self._quick_deaths.get(name, 0)
            self._quick_deaths[name] = quick + 1
            delay = min(self.max_delay_s, self.first_delay_s * 2**quick)
            count = self.restarts.get(name, 0) + 1
            self._pending[name] = _Restart(now + delay, count)
            self.say(
                f"{name} exited ({proc.returncode}) after {ran_s:.0f}s; "
                f"restarting it in {delay:.0f}s (restart {count})"
            )
        for name, restart in list(self._pending.items()):
            if restart.due > now or self._stopping.is_set():
                continue
            proc = self.stack.restart_app(name)
            del self._pending[name]
            self.restarts[name] = restart.count
            self._started_at[name] = time.monotonic()
            self.say(f"{name} restarted (pid {proc.pid}, restart {restart.count})")
        if self.fatal is None:
            self._check_services()

    def _check_services(self) -> None:
        dead = [(n, p) for n, p in self.stack.procs if p.poll() is not None]
        if dead:
            name, proc = dead[0]
            self.fatal = f"{name} exited ({proc.returncode}); the stack cannot serve without it"
            self.say(self.fatal)
