"""Uploads from disk for the Python client: files found under directories, streamed to
httpx one chunk at a time."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})

OnUploaded = Callable[[Path], object]
T = TypeVar("T")


class LazyFile:
    """A file for httpx's multipart body that opens at its first read and closes at its
    end. Its length comes from ``stat`` (httpx asks via tell/seek when there is no
    ``fileno``), so the Content-Length is known without opening anything."""

    def __init__(self, path: Path, on_uploaded: OnUploaded | None) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.on_uploaded = on_uploaded
        self.pos = 0
        self.handle: IO[bytes] | None = None

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        if self.handle is not None:
            self.handle.seek(self.pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if self.handle is None:
            if self.pos >= self.size:
                return b""
            self.handle = self.path.open("rb")
            self.handle.seek(self.pos)
        chunk = self.handle.read(n)
        self.pos += len(chunk)
        if not chunk or self.pos >= self.size:
            self.close()
            if self.on_uploaded is not None:
                self.on_uploaded(self.path)
        return chunk

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def find_images(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named as they are (the gateway judges them by their bytes), and the image
    files under each directory, walked in name order."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found.extend(
                p
                for p in sorted(item.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    return found


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
