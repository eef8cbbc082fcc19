"""A batch's state from the counts of its jobs' states."""

from __future__ import annotations

import pytest

from hepato.common.constants import batch_state


@pytest.mark.parametrize(
    ("counts", "state"),
    [
        ({"pending": 3}, "pending"),
        ({"pending": 2, "processing": 1}, "processing"),
        ({"pending": 2, "done": 1}, "processing"),
        ({"done": 3}, "done"),
        ({"done": 2, "canceled": 1}, "done"),
        ({"done": 2, "failed": 1}, "done_with_failures"),
        ({"done": 2, "expired": 1}, "done_with_failures"),
    ],
)
def test_batch_state(counts: dict[str, int], state: str) -> None:
    assert batch_state(counts) == state
