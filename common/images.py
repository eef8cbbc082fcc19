"""Upload validation: the format is sniffed from the bytes, never from the name or
Content-Type, and the pixel count is checked from the header before anything decodes."""

from __future__ import annotations

import io
import unicodedata
import warnings
from dataclasses import dataclass

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from common.exceptions import ImageTooLarge, InvalidImage, UnsupportedImageFormat

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
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}
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


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name, _ in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def inspect_image(data: bytes, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check an upload without decoding its pixels; raise an InvalidImage subclass
    whose message says what is wrong."""
    if not data:
        raise InvalidImage("empty file")
    if len(data) > max_bytes:
        # The route may read only max_bytes + 1 of a larger file, so no exact size here.
        raise ImageTooLarge(f"file is larger than the limit of {max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageFormat(
            "not an accepted image format (the bytes are not "
            + ", ".join(f.upper() for f in ALLOWED_FORMATS)
            + ")"
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own MAX_IMAGE_PIXELS (89 M), and about damaged tags, with
            # text from the upload: max_pixels is the limit here, and damage that matters
            # raises. Its bomb error past twice its limit stays on, as a backstop.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"image is {width}x{height} pixels, the limit is {max_pixels} pixels"
                    )
                _check_complete(fmt, img, data)
                # verify() walks the file structure (PNG chunk CRCs, TIFF IFDs) cheaply.
                img.verify()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image declares too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"corrupt {fmt.upper()} file: cannot read its header") from exc
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types for broken files
        raise InvalidImage(f"corrupt {fmt.upper()} file: {exc}") from exc
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    return ImageInfo(format=fmt, content_type=MIME_TYPES[fmt], width=width, height=height)


def _check_complete(fmt: str, img: Image.Image, data: bytes) -> None:
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


def _jpeg_has_end(data: bytes) -> bool:
    """Whether an end-of-image marker (FF D9) follows the first start-of-scan. The
    segments before the scan are skipped by their length, so the markers of an EXIF
    thumbnail do not count; within the scans, image data never holds FF D9."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # junk between segments, which decoders skip too
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return False
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", pos) >= 0
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def display_name(filename: str, max_chars: int = 1024) -> str:
    """A client's filename as display text: it never names an object, but Postgres text
    cannot hold NUL and control characters garble logs and terminals, so each becomes
    U+FFFD; the length is capped so a name cannot outweigh its job's JSON."""
    clean = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in filename)
    return clean if len(clean) <= max_chars else clean[: max_chars - 1] + "\u2026"
