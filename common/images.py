"""Upload validation: the format is sniffed from the bytes, never from the name or
Content-Type, and the pixel count is checked from the header before anything decodes.

Uploads are checked where they lie (the gateway's spooled temporary file): the size comes
from seeking to the end, and the structure checks read the file in bounded chunks, so a
large image is never held in memory whole."""

from __future__ import annotations

import io
import os
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from hepato.common.exceptions import ImageTooLarge, InvalidImage, UnsupportedImageFormat

# (magic bytes at offset 0, format name, MIME type)
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"\xff\xd8\xff", "jpeg", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"II*\x00", "tiff", "image/tiff"),
    (b"MM\x00*", "tiff", "image/tiff"),
    (b"II+\x00", "tiff", "image/tiff"),
    (b"MM\x00+", "tiff", "image/tiff"),
    (b"BM", "bmp", "image/bmp"),
)
ALLOWED_FORMATS = ("jpeg", "png", "tiff", "bmp", "webp")
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}
# Pillow keeps up to 64 MiB of decompressed PNG text (zTXt, iTXt, iCCP) per image; no
# caller here reads it, so a chunk bomb is refused at 8 MiB instead (process-wide: only
# the gateway opens uploads with Pillow; the worker decodes with OpenCV).
PngImagePlugin.MAX_TEXT_MEMORY = 8 * 1024 * 1024
MIME_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "tiff": "image/tiff",
    "bmp": "image/bmp",
    "webp": "image/webp",
}
# Enough for every signature above (WebP's is at bytes 8-12).
_SNIFF_BYTES = 16
# How much of a file the structure checks read at a time.
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    width: int
    height: int
    size: int  # bytes


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name, _ in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def file_size(file: IO[bytes]) -> int:
    """Bytes in a seekable file, found without reading it; the position is left at 0."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    return size


@contextmanager
def pillow_reading(fmt: str) -> Iterator[None]:
    """Pillow reading a ``fmt`` file: its many errors for a broken file become the
    InvalidImage (ImageTooLarge for its bomb error) that names the problem. Its warnings
    (past its own MAX_IMAGE_PIXELS, 89 M; damaged tags, with text from the upload) are
    off: the caller's max_pixels is the limit, and damage that matters raises; the bomb
    error past twice Pillow's limit stays on, as a backstop."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image declares too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"corrupt {fmt.upper()} file: cannot read its header") from exc
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types for broken files
        raise InvalidImage(f"corrupt {fmt.upper()} file: {exc}") from exc


def inspect_image(data: bytes | IO[bytes], max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check an upload (its bytes, or a seekable binary file, read from its start in
    bounded chunks) without decoding its pixels; raise an InvalidImage subclass whose
    message says what is wrong. A file is left at position 0."""
    file = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    size = file_size(file)
    if not size:
        raise InvalidImage("empty file")
    if size > max_bytes:
        # No exact size in the message: a caller may hold only max_bytes + 1 of a file.
        raise ImageTooLarge(f"file is larger than the limit of {max_bytes} bytes")
    fmt = sniff_format(file.read(_SNIFF_BYTES))
    file.seek(0)
    if fmt is None:
        raise UnsupportedImageFormat(
            "not an accepted image format (the bytes are not "
            + ", ".join(f.upper() for f in ALLOWED_FORMATS)
            + ")"
        )
    try:
        # Pillow reads a file object lazily and leaves it open (it is not Pillow's).
        with pillow_reading(fmt), Image.open(file, formats=[PIL_FORMATS[fmt]]) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} pixels, the limit is {max_pixels} pixels"
                )
            _check_complete(fmt, img, _FileBytes(file, size))
            # verify() walks the file structure (PNG chunk CRCs, TIFF IFDs) cheaply.
            file.seek(0)
            img.verify()
    finally:
        file.seek(0)
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    return ImageInfo(
        format=fmt, content_type=MIME_TYPES[fmt], width=width, height=height, size=size
    )


class _FileBytes:
    """The few bytes-like reads the structure checks make (one byte, a short slice,
    find), served from a seekable file through a small window so that walking segment
    headers does not seek per byte and a search reads the file one chunk at a time."""

    def __init__(self, file: IO[bytes], size: int, window: int = 1 << 16) -> None:
        self.file = file
        self.size = size
        self.window = window
        self.start = 0
        self.buffer = b""

    def __len__(self) -> int:
        return self.size

    def span(self, begin: int, end: int) -> bytes:
        """Bytes begin..end (fewer at the end of the file), like ``data[begin:end]``."""
        if not (self.start <= begin and end <= self.start + len(self.buffer)):
            self.file.seek(begin)
            self.buffer = self.file.read(max(self.window, end - begin))
            self.start = begin
        return self.buffer[begin - self.start : end - self.start]

    def byte(self, pos: int) -> int:
        return self.span(pos, pos + 1)[0]

    def find(self, needle: bytes, begin: int) -> int:
        """Like ``data.find(needle, begin)``, one chunk in memory at a time; chunks
        overlap by len(needle) - 1 so a needle across their border is found."""
        pos = begin
        while pos < self.size:
            self.file.seek(pos)
            chunk = self.file.read(_CHUNK_BYTES)
            found = chunk.find(needle)
            if found >= 0:
                return pos + found
            if pos + len(chunk) >= self.size or not chunk:
                return -1
            pos += max(1, len(chunk) - len(needle) + 1)
        return -1


def _check_complete(fmt: str, img: Image.Image, data: _FileBytes) -> None:
    """Refuse a truncated JPEG or TIFF from its structure, without decoding (verify()
    already catches a truncated PNG)."""
    if fmt == "jpeg" and not _jpeg_has_end(data):
        raise InvalidImage("truncated JPEG file: no end-of-image marker after the image data")
    if fmt == "tiff":
        tags = img.tag_v2  # type: ignore[attr-defined]
        offsets = tags.get(273) or tags.get(324) or ()  # strip or tile offsets
        counts = tags.get(279) or tags.get(325) or ()  # their byte counts
        end = max((o + c for o, c in zip(offsets, counts, strict=False)), default=0)
        if end > len(data):
            raise InvalidImage(
                f"truncated TIFF file: its image data ends at byte {end}, the file at {len(data)}"
            )


def _jpeg_has_end(data: _FileBytes) -> bool:
    """Whether an end-of-image marker (FF D9) follows the first start-of-scan. The
    segments before the scan are skipped by their length, so the markers of an EXIF
    thumbnail do not count; within the scans, image data never holds FF D9."""
    pos = 2
    while pos + 4 <= len(data):
        if data.byte(pos) != 0xFF:  # junk between segments, which decoders skip too
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return False
            continue
        marker = data.byte(pos + 1)
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", pos) >= 0
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data.span(pos + 2, pos + 4), "big")
    return False


def display_name(filename: str, max_chars: int = 1024) -> str:
    """A client's filename as display text: it never names an object, but Postgres text
    cannot hold NUL and control characters garble logs and terminals, so each becomes
    U+FFFD; the length is capped so a name cannot outweigh its job's JSON."""
    clean = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in filename)
    return clean if len(clean) <= max_chars else clean[: max_chars - 1] + "\u2026"
