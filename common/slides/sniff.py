"""Which whole-slide format a file is, from its bytes and structure, never its name.

The TIFF families are told apart as OpenSlide and tiffslide tell them apart (Aperio by
the first ImageDescription, NDPI by its private tags, OME by its XML), and a TIFF must be
a tiled pyramid to count as a slide: a stripped or single-level TIFF is an image, not a
slide. Every tile and strip the TIFF declares must lie inside the file, so a truncated
upload is refused here rather than failing halfway through a slide's tiles. DICOM is
recognised by its file meta group, which must name the VL Whole Slide Microscopy Image
SOP class."""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import tifffile

from hepato.common.exceptions import InvalidSlide, TruncatedSlide, UnsupportedSlideFormat

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Formats an upload is most often confused with, named in the refusal.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"PK\x03\x04", "a ZIP archive"),
)


class SlideFormat(enum.StrEnum):
    APERIO_SVS = "aperio-svs"
    HAMAMATSU_NDPI = "hamamatsu-ndpi"
    OME_TIFF = "ome-tiff"
    GENERIC_TIFF = "generic-tiff"
    DICOM = "dicom"


def file_suffix(fmt: str) -> str:
    """The file name suffix of a slide stored in this format (its object key's)."""
    return {"aperio-svs": "svs", "hamamatsu-ndpi": "ndpi", "dicom": "dcm"}.get(fmt, "tiff")


Backend = Literal["openslide", "tiffslide"]


@dataclass(frozen=True)
class Sniffed:
    format: SlideFormat
    # OpenSlide reads levels only from the main IFD chain; a pyramid in SubIFDs (OME-TIFF,
    # or a generic TIFF written that way) needs tiffslide.
    backend: Backend


def sniff_slide(source: str | os.PathLike[str] | BinaryIO) -> Sniffed:
    """The slide format of the file at ``source`` (a path, or a seekable binary file such
    as an upload's spooled copy, left where it was); raises InvalidSlide (or a subclass)
    naming why the file is not a slide we can read."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return _sniff(f)
    position = source.tell()
    try:
        return _sniff(source)
    finally:
        source.seek(position)


def _sniff(f: BinaryIO) -> Sniffed:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(132)
    if size == 0:
        raise UnsupportedSlideFormat("the file is empty")
    if head[128:132] == b"DICM":
        _check_dicom(f, size)
        return Sniffed(SlideFormat.DICOM, "openslide")
    if head[:4] in _TIFF_MAGIC:
        f.seek(0)
        return _sniff_tiff(f, size)
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            raise UnsupportedSlideFormat(f"{name}, not a pyramidal whole-slide image")
    raise UnsupportedSlideFormat("not a whole-slide format (neither TIFF-based nor DICOM)")


def _sniff_tiff(f: BinaryIO, size: int) -> Sniffed:
    try:
        # tifffile leaves a file object it was given open.
        with tifffile.TiffFile(f, name="slide.tif") as tif:
            return _classify(tif, size)
    except InvalidSlide:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, struct.error, IndexError) as e:
        # tifffile reports a cut-off directory as whatever it tripped over.
        raise InvalidSlide(f"the TIFF structure cannot be read (damaged or truncated): {e}") from e


def _classify(tif: tifffile.TiffFile, size: int) -> Sniffed:
    pages = list(tif.pages)
    if not pages:
        raise TruncatedSlide("the TIFF holds no image directory")
    first = pages[0]
    assert isinstance(first, tifffile.TiffPage)
    description = first.description or ""
    if tif.is_ndpi:
        _check_extent(pages, size)
        return Sniffed(SlideFormat.HAMAMATSU_NDPI, "openslide")
    if not first.is_tiled:
        raise UnsupportedSlideFormat(
            "a stripped (untiled) TIFF: an ordinary image, not a pyramidal whole-slide image"
        )
    if tif.is_ome:
        levels = tif.series[0].levels
        if len(levels) < 2:
            raise UnsupportedSlideFormat("an OME-TIFF with one resolution, not a pyramid")
        _check_extent([p for lv in levels for p in lv.pages if p is not None], size)
        _check_extent(pages, size)
        return Sniffed(SlideFormat.OME_TIFF, "tiffslide")
    _check_extent(pages, size)
    if description.startswith("Aperio"):
        # A scanner's SVS is a slide even with one level (small regions are saved so).
        return Sniffed(SlideFormat.APERIO_SVS, "openslide")
    tiled = [p for p in pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
    if len(tiled) >= 2:
        return Sniffed(SlideFormat.GENERIC_TIFF, "openslide")
    if len(tif.series[0].levels) >= 2:
        _check_extent([p for lv in tif.series[0].levels for p in lv.pages if p is not None], size)
        return Sniffed(SlideFormat.GENERIC_TIFF, "tiffslide")
    raise UnsupportedSlideFormat(
        "a single-level tiled TIFF: not a pyramid, so not a whole-slide image"
    )


def _check_extent(pages: Sequence[object], size: int) -> None:
    """Every strip or tile must end inside the file."""
    for page in pages:
        if not isinstance(page, tifffile.TiffPage):
            continue
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
        if ends and max(ends) > size:
            raise TruncatedSlide(
                f"truncated: image data of TIFF directory {page.index} ends at byte "
                f"{max(ends)}, past the end of the file ({size} bytes)"
            )


def _check_dicom(f: BinaryIO, size: int) -> None:
    """Read the file meta group (always explicit VR little endian) for the SOP class."""
    f.seek(132)
    meta = f.read(64 * 1024)
    pos, sop_class = 0, None
    while True:
        if pos + 8 > len(meta):
            raise TruncatedSlide("truncated: the DICOM file meta information is cut off")
        group, element = struct.unpack_from("<HH", meta, pos)
        if group != 0x0002:
            break
        vr = meta[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", meta, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", meta, pos + 6)
            start = pos + 8
        if start + length > len(meta):
            raise TruncatedSlide("truncated: the DICOM file meta information is cut off")
        if element == 0x0002:
            sop_class = meta[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if sop_class != WSI_SOP_CLASS:
        raise UnsupportedSlideFormat(
            f"a DICOM file, but not a whole-slide image (SOP class {sop_class or 'missing'})"
        )
    if size <= 132 + pos:
        raise TruncatedSlide("truncated: the DICOM file ends after its meta information")
