"""The tile grid a model reads a whole slide by, planned without any I/O.

Tiles are ``tile_px`` model pixels a side at the model's resolution and overlap their
neighbours by ``overlap_px``; in level-0 pixels that is ``w0 = round(tile_px * ds)`` and
``ov0 = round(overlap_px * ds)`` with ``ds = model_mpp / slide_mpp``. Each tile owns a
*core*: the part of the slide whose detections it reports. Neighbouring cores meet at the
middle of their overlap, at one integer boundary both tiles share, and the outer cores run
to the slide's edges, so the cores of the whole grid partition the slide exactly: every
level-0 point lies in one core, whichever tiles are kept. A tile is kept when its core
touches tissue in the mask; the test is vectorised (one cumulative sum of the mask), so a
grid of 100k tiles plans in a fraction of a second.

Tile starts are multiples of the level-0 stride along each axis (``tile_geometry``): what
lets a region query name a viewport's tile rows exactly (gateway.routes.slide_regions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hepato.common.slides.tissue import TissueMask


@dataclass(frozen=True, slots=True)
class Tile:
    """One read of the model: the level-0 rectangle (x, y, w, h), which may run past the
    slide's right and bottom edges (reads pad with white), and its core, the half-open
    level-0 rectangle [core_x0, core_x1) x [core_y0, core_y1) it reports for."""

    x: int
    y: int
    w: int
    h: int
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int


@dataclass(frozen=True, slots=True)
class TileGeometry:
    """A grid's tile size and stride (start to start) in level-0 pixels, per axis."""

    w: int
    h: int
    stride_x: int
    stride_y: int


def tile_geometry(
    slide_mpp: tuple[float, float], model_mpp: float, tile_px: int, overlap_px: int
) -> TileGeometry:
    """The level-0 tile size and stride of the grid ``plan_tiles`` cuts: the one
    rounding rule both use."""
    w, sx = _size_stride(model_mpp / slide_mpp[0], tile_px, overlap_px, "x")
    h, sy = _size_stride(model_mpp / slide_mpp[1], tile_px, overlap_px, "y")
    return TileGeometry(w, h, sx, sy)


def core_contains(tile: Tile, cx: float, cy: float) -> bool:
    """Whether level-0 point (cx, cy) lies in the tile's core (half-open)."""
    return tile.core_x0 <= cx < tile.core_x1 and tile.core_y0 <= cy < tile.core_y1


def plan_tiles(
    width: int,
    height: int,
    slide_mpp: tuple[float, float],
    model_mpp: float,
    tile_px: int,
    overlap_px: int,
    mask: TissueMask | None,
) -> list[Tile]:
    """The tiles covering a ``width`` x ``height`` level-0 slide whose cores touch tissue
    in ``mask`` (all of them when ``mask`` is None), in row-major order."""
    if width < 1 or height < 1:
        raise ValueError(f"slide size {width}x{height} must be positive")
    if tile_px < 1:
        raise ValueError(f"tile_px must be at least 1, not {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(
            f"overlap_px ({overlap_px}) must be at least 0 and less than tile_px ({tile_px})"
        )
    for name, value in (("slide mpp x", slide_mpp[0]), ("slide mpp y", slide_mpp[1])):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive, not {value}")
    if not (math.isfinite(model_mpp) and model_mpp > 0):
        raise ValueError(f"model_mpp must be positive, not {model_mpp}")

    geo = tile_geometry(slide_mpp, model_mpp, tile_px, overlap_px)
    w0, h0 = geo.w, geo.h
    xs, bx = _axis(width, w0, geo.stride_x)
    ys, by = _axis(height, h0, geo.stride_y)
    keep = np.ones((len(ys), len(xs)), bool) if mask is None else _touches_tissue(mask, bx, by)
    rows, cols = np.nonzero(keep)  # row-major, as nonzero walks C order
    x_l, y_l = xs.tolist(), ys.tolist()
    bx_l, by_l = bx.tolist(), by.tolist()
    return [
        Tile(x_l[c], y_l[r], w0, h0, bx_l[c], by_l[r], bx_l[c + 1], by_l[r + 1])
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    ]


def _size_stride(ds: float, tile_px: int, overlap_px: int, name: str) -> tuple[int, int]:
    """Along one axis at downsample ``ds``: the tile size and stride, level-0 pixels."""
    size = round(tile_px * ds)
    overlap = round(overlap_px * ds)
    stride = size - overlap
    if size < 1 or stride < 1:
        raise ValueError(
            f"in {name}, {tile_px} px tiles overlapping by {overlap_px} px at downsample "
            f"{ds:g} round to {size} level-0 px with a stride of {stride}: nothing to step by"
        )
    return size, stride


def _axis(length: int, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis: the tiles' starts and the n + 1 core boundaries, in level-0
    pixels, for tiles of ``size`` every ``stride``."""
    overlap = size - stride
    # The fewest tiles whose last one reaches the edge: (n - 1) * stride + size >= length.
    n = 1 if length <= size else 1 + -(-(length - size) // stride)
    starts = np.arange(n, dtype=np.int64) * stride
    bounds = np.empty(n + 1, np.int64)
    bounds[0], bounds[n] = 0, length
    # Both neighbours use the same integer, so cores abut with no gap and no overlap.
    # Minimal n puts (n - 1) * stride + overlap below the length, so no core is empty.
    bounds[1:n] = starts[1:] + overlap // 2
    return starts, bounds


def _touches_tissue(mask: TissueMask, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """(rows, columns) booleans: whether each core holds at least one tissue pixel.
    Mask pixel j spans level-0 [j*ds, (j+1)*ds), so core [x0, x1) touches mask pixels
    floor(x0/ds) .. ceil(x1/ds) - 1."""
    m = mask.mask
    ds = mask.downsample
    ys, ye = _mask_span(by, ds, m.shape[0])
    xs, xe = _mask_span(bx, ds, m.shape[1])
    if m.size == 0:
        return np.zeros((len(ys), len(xs)), bool)
    # Cut the mask at every row-span edge and OR each band of rows down to one row, eight
    # mask pixels per uint64 (a cheap pass, no mask-sized integer array); then count
    # along x in the few band rows.
    ey = np.unique(np.concatenate(([0], ys, ye)))
    ey = ey[ey < m.shape[0]]
    bands = _or_rows(m, ey)
    cum = np.zeros((len(ey) + 1, m.shape[1] + 1), np.int64)
    cum[1:, 1:] = bands.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    # Every row-span edge is a cut (or the mask's end), so it indexes the band grid.
    ey = np.append(ey, m.shape[0])
    r0, r1 = np.searchsorted(ey, ys)[:, None], np.searchsorted(ey, ye)[:, None]
    c0, c1 = xs[None, :], xe[None, :]
    counts = cum[r1, c1] - cum[r0, c1] - cum[r1, c0] + cum[r0, c0]
    return counts > 0


def _mask_span(bounds: np.ndarray, ds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each core's first mask pixel and one past its last, clipped to the mask."""
    first = np.clip(np.floor(bounds[:-1] / ds), 0, size).astype(np.int64)
    end = np.clip(np.ceil(bounds[1:] / ds), 0, size).astype(np.int64)
    return first, np.maximum(end, first)


def _or_rows(m: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(len(starts), width) booleans: the OR of mask rows [starts[k], starts[k+1]), the
    last band running to the bottom. ``starts`` is increasing, from 0, below the height."""
    height, width = m.shape
    padded = -(-width // 8) * 8
    packed = np.zeros((height, padded), np.uint8)
    packed[:, :width] = m
    words = np.bitwise_or.reduceat(packed.view(np.uint64), starts, axis=0)
    return words.view(np.uint8)[:, :width] != 0
