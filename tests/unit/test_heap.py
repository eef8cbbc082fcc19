"""common.heap: the service processes freeze what they loaded at start and collect the
young generation less often. In a subprocess: a frozen pytest process would keep every
object of every later test alive."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import gc
from hepato.common import heap
before = gc.get_threshold()
frozen = heap.settle()
assert frozen == gc.get_freeze_count() > 1_000, frozen
assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()
# What is made after settling is collected as ever: a cycle made now is freed.
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
del a, b
assert gc.collect() >= 2
print("ok")
"""


def test_settle_freezes_what_was_loaded_and_keeps_collecting_the_rest() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
