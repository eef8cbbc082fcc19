"""The garbage collector of the long-running service processes (``hepato gateway``,
``hepato worker``).

CPython's full collection walks every tracked object while holding the GIL, so its
pause grows with the heap: in a gateway with 2,000 callers waiting on /v1/predict, about
180,000 of the objects it walked were the modules, classes and functions loaded at
start, which live as long as the process. ``settle`` runs one full collection once the
process has loaded everything, then moves what survived into the collector's permanent
generation (``gc.freeze``), which later collections skip: each of them walks only what
the process made since, and a fork (the worker's decoders) shares those pages instead
of copying them when the collector would have touched them.

Only process entry points call it: frozen objects are never collected, so in a process
that builds and drops services (the tests) it would keep every one alive."""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Allocations (net of frees) between two young collections; CPython's default is 700.
YOUNG_THRESHOLD = 50_000


def settle() -> int:
    """Collect, then freeze what is left; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    frozen = gc.get_freeze_count()
    log.debug("froze %d objects loaded at start", frozen)
    return frozen
