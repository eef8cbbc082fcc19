"""The worker's local slide copies: fetched once, bounded by their disk budget, and a
reader that failed a read replaced by a fresh one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hepato.common.exceptions import InvalidSlide
from hepato.common.jobs import ClaimedJob
from hepato.common.slides.cache import SlideCache
from hepato.worker.slides import read_tile, tile_error
from tests.slides import make


class FakeStore:
    """Serves local files as objects and counts the downloads."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.downloads: list[str] = []
        self.lock = threading.Lock()

    def download_to(self, key: str, path: Path, chunk_bytes: int = 0) -> int:
        with self.lock:
            self.downloads.append(key)
        data = self.files[key].read_bytes()
        path.write_bytes(data)
        return len(data)


@pytest.fixture
def slides(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": make.write_svs(tmp_path / "a.svs"),
        "b": make.write_generic_tiff(tmp_path / "b.tiff"),
    }


def test_a_slide_is_fetched_once_by_many_threads(tmp_path: Path, slides: dict[str, Path]) -> None:
    store = FakeStore(slides)
    cache = SlideCache(tmp_path / "cache", 10**9, store)  # type: ignore[arg-type]

    def read() -> None:
        with cache.reader("a") as reader:
            reader.read_region(0, 0, 0, 64, 64)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.downloads == ["a"]


def test_past_the_budget_the_least_recently_read_copy_goes(
    tmp_path: Path, slides: dict[str, Path]
) -> None:
    store = FakeStore(slides)
    budget = max(p.stat().st_size for p in slides.values()) + 1
    cache = SlideCache(tmp_path / "cache", budget, store)  # type: ignore[arg-type]
    cache.path("a")
    cache.path("b")  # over budget: a goes
    assert len(list((tmp_path / "cache").glob("*.slide"))) == 1
    cache.path("a")
    assert store.downloads == ["a", "b", "a"]


def test_a_failed_read_gets_a_fresh_reader_and_is_retried(
    tmp_path: Path, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FakeStore(slides)
    cache = SlideCache(tmp_path / "cache", 10**9, store)  # type: ignore[arg-type]
    job = ClaimedJob(None, "a", 1, 3, None, kind="tile", tile=(0, 0, 256, 256))  # type: ignore[arg-type]
    with cache.reader("a") as first:
        pass

    def broken(*args: object) -> object:
        raise InvalidSlide("reading a region of the slide failed: bad JPEG")

    monkeypatch.setattr(type(first), "read_region", broken)
    with pytest.raises(InvalidSlide) as caught:
        read_tile(cache, job, 128)
    permanent, reason = tile_error(caught.value)
    assert not permanent and "bad JPEG" in reason
    monkeypatch.undo()
    with cache.reader("a") as second:
        assert second is not first
    assert read_tile(cache, job, 128).shape == (128, 128, 3)
    assert store.downloads == ["a"]
