"""Cores of its own for the model (settings.model_cpus): on a CPU host, a worker runs its
model's threads on some cores and everything else (intake, decoder processes, writes) on
the others, so that the stack's hops never preempt the model's threads, which wait for
each other at every layer. Linux thread affinity: a thread or process started by a pinned
thread inherits its cores, which is how ONNX Runtime's and PyTorch's pools get theirs.

The cores a process may use are its affinity, not ``os.cpu_count()``: in a container
given a cpuset (Kubernetes' static CPU manager, ``docker run --cpuset-cpus``) the machine
has many more cores than the process may run on (``usable``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

# "last:N": the last N cores the process may use when it starts (a container's cpuset is
# only known then), for a deployment that cannot write the cores down in advance.
_LAST = re.compile(r"last:(\d+)")


def allowed() -> frozenset[int]:
    """The cores the calling thread may run on."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def usable() -> int:
    """How many cores the calling thread may run on (threads to start for a pool)."""
    return len(allowed())


def share(processes: int) -> int:
    """Cores each of ``processes`` gets when they share the usable ones (at least one)."""
    return max(1, usable() // processes)


def _last(text: str) -> int | None:
    """N of a "last:N" ``text`` (ValueError if N < 1); None for anything else."""
    last = _LAST.fullmatch(text.strip())
    if last is None:
        return None
    if int(last[1]) < 1:
        raise ValueError(f"{text!r}: last:N takes at least one core")
    return int(last[1])


def check(text: str) -> None:
    """Raise ValueError naming the problem unless ``text`` is a CPU list or "last:N"."""
    if _last(text) is None:
        parse(text)


def parse(text: str) -> frozenset[int]:
    """A Linux CPU list ("1", "0,2", "4-7,12") as a set of core numbers."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as '1', '0,2' or '4-7'")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part!r} in {text!r} counts down; write it {high}-{low}")
        cores.update(range(low, high + 1))
    return frozenset(cores)


@dataclass(frozen=True)
class Split:
    model: frozenset[int]  # the model's threads
    rest: frozenset[int]  # every other thread and process of the worker


def split(text: str) -> Split | None:
    """The model's cores from ``text`` (a CPU list, or "last:N" of the allowed cores) and
    the rest of this thread's allowed cores; None when ``text`` is empty (no pinning). The
    rest is every allowed core when the model takes them all (nothing left to keep apart)."""
    if not text.strip():
        return None
    mine, count = allowed(), _last(text)
    if count is None:
        model = parse(text)
    elif count > len(mine):
        raise ValueError(
            f"model_cpus {text!r} asks for {count} cores; this process may use "
            f"{len(mine)} ({format_list(mine)})"
        )
    else:
        model = frozenset(sorted(mine)[-count:])
    missing = sorted(model - mine)
    if missing:
        raise ValueError(
            f"model_cpus {text!r} names cores {missing} this process may not use "
            f"(allowed: {format_list(mine)})"
        )
    return Split(model, mine - model or mine)


def pin(cores: Iterable[int]) -> None:
    """The calling thread, and what it starts from now on, on ``cores``."""
    os.sched_setaffinity(0, set(cores))


def format_list(cores: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))
