"""Upload inspection: format from the bytes, limits from the header."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from hepato.common.exceptions import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from hepato.common.images import inspect_image, sniff_format

LIMIT_BYTES = 10_000_000
LIMIT_PIXELS = 50_000_000


def encode(fmt: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 180)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("pil_format", "name"),
    [("JPEG", "jpeg"), ("PNG", "png"), ("TIFF", "tiff"), ("BMP", "bmp"), ("WEBP", "webp")],
)
def test_accepted_formats(pil_format: str, name: str) -> None:
    info = inspect_image(encode(pil_format), LIMIT_BYTES, LIMIT_PIXELS)
    assert (info.format, info.width, info.height) == (name, 32, 24)


@pytest.mark.parametrize(
    "data",
    [b"<html><body>hi</body></html>", b"%PDF-1.7\n", b"\x7fELF\x02\x01\x01", b"<svg xmlns=''/>"],
)
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImageFormat, match="not an accepted image format"):
        inspect_image(data, LIMIT_BYTES, LIMIT_PIXELS)


def test_empty_file() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        inspect_image(b"", LIMIT_BYTES, LIMIT_PIXELS)


def test_too_many_bytes() -> None:
    with pytest.raises(ImageTooLarge, match="bytes"):
        inspect_image(encode("PNG"), 10, LIMIT_PIXELS)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge canvas: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_from_header() -> None:
    with pytest.raises(ImageTooLarge, match="pixels"):
        inspect_image(_png_header(50_000, 50_000), LIMIT_BYTES, LIMIT_PIXELS)


def test_corrupt_png_names_the_format() -> None:
    data = bytearray(encode("PNG"))
    data[40:60] = b"\x00" * 20  # breaks a chunk CRC
    with pytest.raises(InvalidImage, match="PNG"):
        inspect_image(bytes(data), LIMIT_BYTES, LIMIT_PIXELS)


def test_sniff_ignores_names() -> None:
    assert sniff_format(encode("JPEG")) == "jpeg"
    assert sniff_format(b"GIF89a") is None
