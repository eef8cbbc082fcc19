"""Deep Zoom tiles of a slide, as OpenSlide's ``openslide.deepzoom.DeepZoomGenerator``
defines them, for any ``SlideReader`` (OpenSlide or tiffslide backed).

A Deep Zoom image of a W x H slide has ``ceil(log2(max(W, H))) + 1`` levels: the last is
the slide at level-0 resolution, each one before it half the size of the next (rounded
up), down to 1 x 1. A level is cut into tiles of ``TILE_SIZE`` px; each tile also carries
``OVERLAP`` px of its neighbours on every side that has one. A tile is read from the
slide's pyramid level closest above its resolution (never upsampled) and shrunk to its
size. Only regions of the pyramid are read: the label and macro images of a slide cannot
reach a tile. Pillow does the resizing and the JPEG (the gateway has no OpenCV)."""

from __future__ import annotations

import io
import math
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image

from hepato.common.slides.reader import SlideReader

TILE_SIZE = 254
OVERLAP = 1
FORMAT = "jpeg"
JPEG_QUALITY = 80
DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"
# Rendered tiles a process keeps (JPEG bytes): about 4,000 tiles of 256 px.
TILE_CACHE_BYTES = 64 * 1024 * 1024


def level_count(width: int, height: int) -> int:
    """ceil(log2(max(width, height))) + 1, in integers (no float rounding at powers of 2)."""
    _check_size(width, height)
    return (max(width, height) - 1).bit_length() + 1


def level_downsample(width: int, height: int, level: int) -> int:
    """Level-0 pixels per pixel of Deep Zoom level ``level``."""
    return 2 ** (level_count(width, height) - 1 - _check_level(width, height, level))


def level_dimensions(width: int, height: int, level: int) -> tuple[int, int]:
    """(width, height) of Deep Zoom level ``level``: the slide divided by the level's
    downsample, rounded up (never below 1)."""
    ds = level_downsample(width, height, level)
    return max(1, -(-width // ds)), max(1, -(-height // ds))


def level_tiles(width: int, height: int, level: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(columns, rows) of tiles of Deep Zoom level ``level``."""
    w, h = level_dimensions(width, height, level)
    return -(-w // tile_size), -(-h // tile_size)


def tile_rect(
    width: int,
    height: int,
    level: int,
    col: int,
    row: int,
    tile_size: int = TILE_SIZE,
    overlap: int = OVERLAP,
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of tile (``col``, ``row``) in pixels of Deep Zoom level ``level``,
    its overlap included: ``overlap`` px more on each side that has a neighbour, clipped
    to the level. Raises ValueError naming the level, column or row out of range."""
    lw, lh = level_dimensions(width, height, level)
    cols, rows = level_tiles(width, height, level, tile_size)
    if not 0 <= col < cols:
        raise ValueError(f"tile column {col} out of range at level {level} (0..{cols - 1})")
    if not 0 <= row < rows:
        raise ValueError(f"tile row {row} out of range at level {level} (0..{rows - 1})")
    x, w = _span(col, cols, lw, tile_size, overlap)
    y, h = _span(row, rows, lh, tile_size, overlap)
    return x, y, w, h


def descriptor_xml(width: int, height: int) -> str:
    """The .dzi descriptor of a ``width`` x ``height`` slide (JPEG tiles), as
    DeepZoomGenerator.get_dzi writes it."""
    _check_size(width, height)
    image = ET.Element(
        "Image",
        TileSize=str(TILE_SIZE),
        Overlap=str(OVERLAP),
        Format=FORMAT,
        xmlns=DZI_NAMESPACE,
    )
    ET.SubElement(image, "Size", Width=str(width), Height=str(height))
    body = ET.tostring(image, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}'


def render_tile(reader: SlideReader, level: int, col: int, row: int) -> bytes:
    """Tile (``col``, ``row``) of Deep Zoom level ``level`` of the slide, as JPEG bytes.

    The region is read at the pyramid level whose downsample is the largest not above the
    Deep Zoom level's (as DeepZoomGenerator does), then shrunk to the tile's size with an
    area (box) filter."""
    width, height = reader.dimensions
    x, y, w, h = tile_rect(width, height, level, col, row)
    ds = level_downsample(width, height, level)
    slide_level = reader.best_level_for_downsample(ds)
    # Deep Zoom level pixels to slide-level pixels.
    scale = ds / reader.level_downsamples[slide_level]
    sw, sh = reader.level_dimensions[slide_level]
    lx, ly = scale * x, scale * y
    # Rounded up in size, as DeepZoomGenerator does, and clipped to the slide level.
    rw = max(1, min(math.ceil(scale * w), sw - math.ceil(lx)))
    rh = max(1, min(math.ceil(scale * h), sh - math.ceil(ly)))
    # Level-0 corner: slide-level position times its downsample is ds * x, an integer.
    region = reader.read_region(slide_level, ds * x, ds * y, rw, rh)
    image = Image.fromarray(region, "RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BOX)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class TileCache:
    """Rendered tiles by key, the least recently used dropped past ``max_bytes``;
    safe to share between threads."""

    def __init__(self, max_bytes: int = TILE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(key, None)
            self._bytes += len(data) - (len(old) if old is not None else 0)
            self._tiles[key] = data
            while self._bytes > self.max_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._tiles)


def _span(index: int, count: int, limit: int, tile_size: int, overlap: int) -> tuple[int, int]:
    """(start, length) of the ``index``-th of ``count`` tiles along an axis of ``limit`` px."""
    before = overlap if index > 0 else 0
    after = overlap if index < count - 1 else 0
    start = index * tile_size
    return start - before, min(tile_size, limit - start) + before + after


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"slide size {width}x{height} out of range")


def _check_level(width: int, height: int, level: int) -> int:
    count = level_count(width, height)
    if not 0 <= level < count:
        raise ValueError(f"level {level} out of range (0..{count - 1})")
    return level
