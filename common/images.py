"""Upload validation: the format is sniffed from the bytes, never from the name or
Content-Type, and the pixel count is checked from the header before anything decodes."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

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
        raise ImageTooLarge(f"file is {len(data)} bytes, the limit is {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageFormat(
            "not an accepted image format (the bytes are not "
            + ", ".join(f.upper() for f in ALLOWED_FORMATS)
            + ")"
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse at the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"image is {width}x{height} pixels, the limit is {max_pixels} pixels"
                    )
                # verify() walks the file structure (PNG chunk CRCs, TIFF IFDs) cheaply.
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
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
