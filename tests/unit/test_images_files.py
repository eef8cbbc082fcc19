"""Upload inspection from a file (as the gateway does it, from the spooled upload): the
same answers as from bytes, the file left at its start, bounded reads."""

from __future__ import annotations

import io
import random
import tempfile

import pytest
from PIL import Image

from hepato.common import images
from hepato.common.exceptions import ImageTooLarge, InvalidImage
from hepato.common.images import _FileBytes, inspect_image

LIMIT_BYTES = 10_000_000
LIMIT_PIXELS = 50_000_000


def encode(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def spooled(data: bytes) -> tempfile.SpooledTemporaryFile[bytes]:
    """As Starlette keeps an upload: on disk past max_size (here, always)."""
    file = tempfile.SpooledTemporaryFile(max_size=1)  # noqa: SIM115 (the caller's with closes it)
    file.write(data)
    file.seek(0)
    return file


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "WEBP"])
def test_a_file_gives_what_its_bytes_give(fmt: str) -> None:
    data = encode(fmt)
    with spooled(data) as file:
        file.seek(17)  # wherever the caller left it
        info = inspect_image(file, LIMIT_BYTES, LIMIT_PIXELS)
        assert file.tell() == 0, "left at its start, ready to be stored"
    assert info == inspect_image(data, LIMIT_BYTES, LIMIT_PIXELS)
    assert (info.width, info.height, info.size) == (64, 48, len(data))


@pytest.mark.parametrize(
    ("fmt", "why"),
    [("JPEG", "truncated JPEG file: no end-of-image marker"), ("TIFF", "truncated TIFF file")],
)
def test_a_truncated_file_is_refused_and_rewound(fmt: str, why: str) -> None:
    data = encode(fmt, (256, 256))
    with spooled(data[: len(data) * 2 // 3]) as file, pytest.raises(InvalidImage, match=why):
        try:
            inspect_image(file, LIMIT_BYTES, LIMIT_PIXELS)
        finally:
            assert file.tell() == 0


def test_a_file_over_the_limit_is_refused_unread() -> None:
    file = CountingFile(encode("PNG"))
    with pytest.raises(ImageTooLarge, match="file is larger than the limit of 100 bytes"):
        inspect_image(file, 100, LIMIT_PIXELS)
    assert file.bytes_read == 0


def test_an_empty_file_is_refused() -> None:
    with spooled(b"") as file, pytest.raises(InvalidImage, match="empty file"):
        inspect_image(file, LIMIT_BYTES, LIMIT_PIXELS)


def test_the_jpeg_scan_reads_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over many chunks of scan data, the end marker is still found (and missed)."""
    monkeypatch.setattr(images, "_CHUNK_BYTES", 4096)
    data = encode("JPEG", (512, 512))
    assert len(data) > 10 * images._CHUNK_BYTES
    with spooled(data) as file:
        assert inspect_image(file, LIMIT_BYTES, LIMIT_PIXELS).size == len(data)
    with spooled(data[:-2]) as file, pytest.raises(InvalidImage, match="truncated JPEG"):
        inspect_image(file, LIMIT_BYTES, LIMIT_PIXELS)


def test_find_is_bytes_find_across_chunk_borders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "_CHUNK_BYTES", 7)
    rng = random.Random(0)
    for _ in range(300):
        data = bytes(rng.choice(b"\x00\xff\xd9\x12") for _ in range(rng.randrange(0, 60)))
        view = _FileBytes(io.BytesIO(data), len(data), window=5)
        for needle in (b"\xff", b"\xff\xd9"):
            start = rng.randrange(0, len(data) + 1)
            assert view.find(needle, start) == data.find(needle, start), (data, needle, start)
        for pos in range(len(data)):
            assert view.byte(pos) == data[pos]
            assert view.span(pos, pos + 2) == data[pos : pos + 2]
