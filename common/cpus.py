"""Cores of its own for the model (settings.model_cpus): on a CPU host, a worker runs its
model's threads on some cores and everything else (intake, decoder processes, writes) on
the others, so that the stack's hops never preempt the model's threads, which wait for
each other at every layer. Linux thread affinity: a thread or process started by a pinned
thread inherits its cores, which is how ONNX Runtime's and PyTorch's pools get theirs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass


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
    """The model's cores from ``text`` and the rest of this process's allowed cores; None
    when ``text`` is empty (no pinning). The rest is every allowed core when the model
    takes them all (nothing left to keep apart)."""
    if not text.strip():
        return None
    model, allowed = parse(text), frozenset(os.sched_getaffinity(0))
    missing = sorted(model - allowed)
    if missing:
        raise ValueError(
            f"model_cpus {text!r} names cores {missing} this process may not use "
            f"(allowed: {format_list(allowed)})"
        )
    return Split(model, allowed - model or allowed)


def pin(cores: Iterable[int]) -> None:
    """The calling thread, and what it starts from now on, on ``cores``."""
    os.sched_setaffinity(0, set(cores))


def format_list(cores: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))
