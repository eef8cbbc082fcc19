"""One small reader interface over OpenSlide and tiffslide.

``open_slide`` sniffs the file, then opens it with the library that reads that format:
OpenSlide for SVS, NDPI, generic tiled TIFF and DICOM, tiffslide for pyramids kept in
SubIFDs (OME-TIFF). A ``SlideReader`` exposes only what tiling needs: level sizes and
downsamples, microns per pixel, the format and vendor names, and RGB regions. Label and
macro photographs and the scanner's metadata (file name, date, operator) may carry
patient data, so the reader gives no access to associated images or raw properties,
and its repr names nothing read from the file beyond sizes."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from types import TracebackType
from typing import Any

import numpy as np
import openslide
import tiffslide
from PIL import Image

from hepato.common.exceptions import InvalidSlide
from hepato.common.slides.sniff import SlideFormat, sniff_slide

# Decoded pyramid tiles OpenSlide keeps, shared by every slide a process has open, bytes.
# Neighbouring model tiles share the scanner's tiles (a 320 px read spans up to four 256 px
# JPEG tiles), so a cache that holds a few rows of them decodes each JPEG once instead of
# two or three times; it is one fixed amount whatever the number or size of the slides.
OPENSLIDE_CACHE_BYTES = 256 * 1024 * 1024
_shared_cache: openslide.OpenSlideCache | None = None

# A region larger than this is a caller's bug (tiles are a few hundred px on a side);
# refusing it keeps a wrong size from allocating gigabytes.
MAX_REGION_PIXELS = 64 * 1024 * 1024
# OME PhysicalSize units, in micrometres.
_OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class SlideReader:
    """A whole-slide image opened for reading; coordinates are level-0 pixels."""

    __slots__ = ("_closed", "_slide", "format", "level_dimensions", "level_downsamples", "mpp")

    def __init__(
        self, slide: Any, fmt: SlideFormat, mpp: tuple[float, float] | None = None
    ) -> None:
        self._slide = slide
        self._closed = False
        self.format = fmt
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in slide.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in slide.level_downsamples)
        self.mpp: tuple[float, float] | None = mpp or _library_mpp(slide.properties)

    @property
    def thread_safe(self) -> bool:
        """Whether threads may read regions at once: OpenSlide's reads are, tiffslide's
        (one file handle, zarr stores) are not to be trusted so."""
        return not isinstance(self._slide, tiffslide.TiffSlide)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def vendor(self) -> str:
        """The format's vendor as the reading library names it (aperio, hamamatsu,
        generic-tiff, dicom, ...), or the sniffed format when it names none."""
        props = self._slide.properties
        name = props.get("openslide.vendor") or props.get("tiffslide.vendor")
        return str(name) if name else self.format.value

    @property
    def objective_power(self) -> float | None:
        props = self._slide.properties
        value = props.get("openslide.objective-power") or props.get("tiffslide.objective-power")
        return _positive_float(value)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed the one asked for, so
        reading it and shrinking to the wanted resolution never upsamples. Level sizes are
        whole pixels, so a level's downsample is a little off its nominal factor (16.007
        for 16): within 1% counts as equal, or a read would take the level four times
        larger."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """An (height, width, 3) uint8 RGB array of ``level``, its top-left corner at
        level-0 pixel (x, y), as OpenSlide addresses regions. Parts outside the slide or
        without tissue data are white, like the glass."""
        if self._closed:
            raise ValueError("the slide is closed")
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range (0..{self.level_count - 1})")
        if width <= 0 or height <= 0 or width * height > MAX_REGION_PIXELS:
            raise ValueError(f"region size {width}x{height} out of range")
        try:
            if isinstance(self._slide, tiffslide.TiffSlide):
                return self._read_tiffslide(level, int(x), int(y), int(width), int(height))
            region = self._slide.read_region((int(x), int(y)), level, (int(width), int(height)))
        except (openslide.OpenSlideError, ValueError, OSError) as e:
            raise InvalidSlide(f"reading a region of the slide failed: {e}") from e
        return _on_white(region)

    def _read_tiffslide(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        # tiffslide pads what lies outside the level with black (and warns); read only the
        # part inside and lay it on white, as OpenSlide's transparent border composites.
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        # Level-0 coordinates of the clipped corner, rounded up so floor() maps back to it.
        arr = self._slide.read_region(
            (math.ceil(x0 * ds), math.ceil(y0 * ds)),
            level,
            (x1 - x0, y1 - y0),
            as_array=True,
            padding=False,
        )
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        h, w = min(arr.shape[0], y1 - y0), min(arr.shape[1], x1 - x0)
        out[y0 - ly : y0 - ly + h, x0 - lx : x0 - lx + w] = arr[:h, :w, :3]
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp[0]:g}x{self.mpp[1]:g}" if self.mpp else "unknown"
        return (
            f"SlideReader(format={self.format.value}, size={w}x{h}, "
            f"levels={self.level_count}, mpp={mpp})"
        )


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """Open the slide at ``path`` with the library for its sniffed format; raises
    InvalidSlide (or a subclass) naming the reason when it is not a readable slide."""
    sniffed = sniff_slide(path)
    try:
        if sniffed.backend == "tiffslide":
            slide = tiffslide.TiffSlide(os.fspath(path))
            mpp = _ome_mpp(slide) if sniffed.format is SlideFormat.OME_TIFF else None
            return SlideReader(slide, sniffed.format, mpp)
        opened = openslide.OpenSlide(os.fspath(path))
        opened.set_cache(_openslide_cache())
        return SlideReader(opened, sniffed.format)
    except InvalidSlide:
        raise
    except (openslide.OpenSlideError, ValueError, OSError, KeyError, IndexError) as e:
        # OpenSlideUnsupportedFormatError is an OpenSlideError.
        raise InvalidSlide(f"the {sniffed.format.value} slide cannot be opened: {e}") from e


def _on_white(region: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA region as RGB, what lies outside the scanned area (transparent)
    laid on white like the glass. In Pillow's C code: an opaque region, the usual case,
    costs one copy."""
    if region.mode != "RGBA":
        return np.ascontiguousarray(np.asarray(region.convert("RGB")), dtype=np.uint8)
    alpha = region.getchannel("A")
    if alpha.getextrema() != (255, 255):
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=alpha)
        region = white
    return np.ascontiguousarray(np.asarray(region.convert("RGB")), dtype=np.uint8)


def _openslide_cache() -> openslide.OpenSlideCache:
    global _shared_cache
    if _shared_cache is None:
        _shared_cache = openslide.OpenSlideCache(OPENSLIDE_CACHE_BYTES)
    return _shared_cache


def _positive_float(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _library_mpp(props: Any) -> tuple[float, float] | None:
    for prefix in ("openslide", "tiffslide"):
        x = _positive_float(props.get(f"{prefix}.mpp-x"))
        y = _positive_float(props.get(f"{prefix}.mpp-y"))
        if x and y:
            return (x, y)
    return None


def _ome_mpp(slide: Any) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Image, in µm (tiffslide reads MPP only from the
    TIFF resolution tags, which OME writers often leave out)."""
    xml = slide.ts_tifffile.ome_metadata
    if not xml:
        return _library_mpp(slide.properties)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return _library_mpp(slide.properties)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return _library_mpp(slide.properties)
    sizes = []
    for axis in ("X", "Y"):
        value = _positive_float(pixels.get(f"PhysicalSize{axis}"))
        scale = _OME_UNITS.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        sizes.append(value * scale if value and scale else None)
    if sizes[0] and sizes[1]:
        return (sizes[0], sizes[1])
    return _library_mpp(slide.properties)
