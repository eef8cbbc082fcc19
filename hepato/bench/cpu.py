"""Where the CPU went during a measurement: CPU seconds of each part of the stack, read
from the kernel's accounting (psutil) before and after. On a machine where every part
shares the same few cores, this is the profile that says which part a ratio pays for."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import psutil

from hepato.devstack.localstack import LocalStack

# Parts of the stack by process name, in the order the report lists them.
PARTS = ("gateway", "workers", "seaweedfs", "postgres", "redis", "bench client")


def _part(name: str) -> str | None:
    if name == "gateway":
        return "gateway"
    if name.startswith("worker"):
        return "workers"  # with their decoder processes
    if name in ("seaweedfs", "redis"):
        return name
    return None


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _postmaster(stack: LocalStack) -> int | None:
    """Postgres runs detached (pg_ctl), so its postmaster is found by its pid file."""
    server = getattr(stack, "_pg", None)
    if server is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((Path(server.pgdata) / "postmaster.pid").read_text().split()[0])
    return None


def _cpu(processes: Iterable[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def snapshot(stack: LocalStack) -> dict[str, float]:
    """CPU seconds so far of each part (live processes only: a part's processes must
    outlive the measurement for its difference to mean anything)."""
    return {part: _cpu(procs) for part, procs in _processes(stack).items()}


def pin_all_but_workers(stack: LocalStack, cores: Iterable[int]) -> None:
    """Every thread of every part but the workers (which pin their own: settings.
    model_cpus) on ``cores``; Postgres's backends forked later inherit its postmaster's."""
    for part, procs in _processes(stack).items():
        if part != "workers":
            for proc in procs:
                _pin_threads(proc, cores)


def _pin_threads(proc: psutil.Process, cores: Iterable[int]) -> None:
    # sched_setaffinity of a pid sets its main thread only: each thread by its id. One gone
    # meanwhile is skipped.
    with contextlib.suppress(psutil.Error):
        for thread in proc.threads():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(thread.id, set(cores))


def _processes(stack: LocalStack) -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {part: [] for part in PARTS}
    for name, proc in [*stack.procs, *stack.apps]:
        part = _part(name)
        if part is not None and proc.poll() is None:
            found[part].extend(_tree(proc.pid))
    postmaster = _postmaster(stack)
    if postmaster is not None:
        found["postgres"].extend(_tree(postmaster))
    found["bench client"].append(psutil.Process())
    return found


def spent(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """Milliseconds of CPU per finished image, by part, and their total."""
    per = {part: max(0.0, after[part] - before.get(part, 0.0)) for part in after}
    out = {part: round(1000.0 * s / images, 3) for part, s in per.items()} if images else {}
    if out:
        out["total"] = round(sum(out.values()), 3)
    return out
