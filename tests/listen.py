"""Listening to SQLAlchemy events for the length of a block, in tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event


@contextmanager
def listening(hooks: Sequence[tuple[Any, str, Callable[..., None]]]) -> Iterator[None]:
    """``(target, event name, hook)`` listened to inside the block, removed after it."""
    for target, name, hook in hooks:
        event.listen(target, name, hook)
    try:
        yield
    finally:
        for target, name, hook in hooks:
            event.remove(target, name, hook)
