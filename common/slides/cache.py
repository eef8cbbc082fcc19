"""Local copies of whole slides, and the readers open on them: a worker's (its tiles)
and a gateway's (deep-zoom tiles for the viewer).

Tiles are regions of a slide that lives in the object store. Reading each region over
the network would cost a request per tile; instead each process copies a slide to its
disk once (ranged reads, never the whole file in memory), keeps a reader open on it, and
reads every tile it claims from there. The copies are bounded by a disk budget
(``slide_cache_bytes``): past it the least recently used slide not being read is
deleted, and fetched again if one of its tiles comes back."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hepato.common.slides.reader import SlideReader, open_slide
from hepato.common.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    path: Path
    size: int
    reader: SlideReader | None = None
    # Threads reading it now: an entry in use is never evicted.
    users: int = 0
    # tiffslide readers are not safe for concurrent reads; OpenSlide's are.
    lock: threading.Lock = field(default_factory=threading.Lock)


class SlideCache:
    def __init__(self, directory: Path, budget_bytes: int, store: ObjectStore) -> None:
        self.dir = directory
        self.budget_bytes = budget_bytes
        self.store = store
        # Leftovers of an earlier run under this worker's name are stale, partial or both.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        # One download per key at a time: the other threads wanting it wait for it.
        self._fetching: dict[str, threading.Lock] = {}

    @classmethod
    def for_worker(cls, root: Path, worker_id: str, budget: int, store: ObjectStore) -> SlideCache:
        return cls(root / re.sub(r"[^A-Za-z0-9._-]", "_", worker_id), budget, store)

    def path(self, key: str) -> Path:
        """The local copy of object ``key``, fetched now if there is none."""
        with self._use(key) as entry:
            return entry.path

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[SlideReader]:
        """The open reader of slide ``key``, held for this thread's read."""
        with self._use(key) as entry:
            if entry.reader is None:
                with entry.lock:
                    if entry.reader is None:
                        entry.reader = open_slide(entry.path)
            if entry.reader.thread_safe:
                yield entry.reader
            else:
                with entry.lock:
                    yield entry.reader

    def reopen(self, key: str) -> None:
        """Open a fresh reader for ``key`` at its next use. After a read error OpenSlide's
        handle refuses every later read, so one bad tile would fail the slide's others;
        the old reader is dropped, not closed (a thread may still be reading it), and
        goes when the last of them lets go."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.reader = None

    def adopt(self, key: str, path: Path) -> None:
        """Take the file at ``path`` as the copy of ``key`` (a de-identified slide this
        worker made and stored)."""
        target = self.dir / f"{uuid.uuid4().hex}.slide"
        os.replace(path, target)
        with self._lock:
            self._entries[key] = _Entry(target, target.stat().st_size)
            self._evict()

    def forget(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.users == 0:
                del self._entries[key]
                _discard(entry)

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                _discard(entry)
            self._entries.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def _use(self, key: str) -> Iterator[_Entry]:
        entry = self._pin(key)
        if entry is None:
            with self._lock:
                fetching = self._fetching.setdefault(key, threading.Lock())
            with fetching:
                entry = self._pin(key) or self._fetch(key)
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                self._evict()

    def _pin(self, key: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.users += 1
                self._entries.move_to_end(key)
            return entry

    def _fetch(self, key: str) -> _Entry:
        target = self.dir / f"{uuid.uuid4().hex}.slide"
        partial = target.with_suffix(".part")
        try:
            size = self.store.download_to(key, partial)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        log.info("copied slide %s to the local cache (%d bytes)", key, size)
        entry = _Entry(target, size, users=1)
        with self._lock:
            self._entries[key] = entry
            self._fetching.pop(key, None)
        return entry

    def _evict(self) -> None:
        """Past the budget, delete the least recently used copies no thread is reading
        (caller holds the lock). The one being read may keep the cache over budget."""
        total = sum(e.size for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.budget_bytes:
                return
            entry = self._entries[key]
            if entry.users:
                continue
            del self._entries[key]
            total -= entry.size
            _discard(entry)


def _discard(entry: _Entry) -> None:
    if entry.reader is not None:
        with contextlib.suppress(Exception):
            entry.reader.close()
    entry.path.unlink(missing_ok=True)
