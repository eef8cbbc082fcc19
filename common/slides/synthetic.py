"""Synthetic whole slides of any size, written tile by tile in bounded memory.

The tissue is the project's synthetic histology (``samples/synthetic_*.png``, made by
scripts/synthetic_histology.py: the look the demo detector was trained on), laid as a
mosaic of 320 px cells, each one of the samples in one of its eight flips and rotations,
inside a few large blob-shaped regions; elsewhere is white glass, so a tissue mask skips
it. A blob is a star-shaped curve (an ellipse whose radius wobbles with a few harmonics),
so its area is known in closed form and the tissue fraction is what was asked for.

Every pixel of every pyramid level is a pure function of its position: a level-0 tile
and a reduced-level tile are both gathered from the sample cells (pre-shrunk once per
level) and the blob test at the pixel's centre, so no level is ever held whole and
nothing is read back. tifffile takes the tiles from an iterator and compresses them as
they come, so memory does not grow with the slide."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

from hepato.common.settings import REPO_ROOT

SlideKind = Literal["svs", "tiff"]
Compression = Literal["jpeg", "zlib"]

CELL = 320  # side of one sample tile, level-0 px (the samples' own size)
LEVEL_FACTOR = 4  # downsample between pyramid levels, as Aperio scanners write them
GLASS = (243, 243, 243)  # bare glass: no saturation, so never tissue
# Harmonics of the blob outline (their amplitudes shrink when the fraction needs room).
_HARMONICS = (2, 3, 4, 5)
_MAX_AMPLITUDE = 0.05
# A blob's farthest point stays this far (a fraction of its cell) inside its cell.
_MARGIN = 0.02
MAX_TISSUE_FRACTION = 0.7
# Angles at which a blob's outline is tabulated, and the slack a rectangle's test leaves
# for a pixel centre's angle rounding to a neighbouring entry.
_ANGLES = 8192
_SLACK = 0.01
# Tiles painted ahead of the one being encoded: enough to keep the threads busy, few
# enough that memory stays a few megabytes.
_AHEAD = 16


@dataclass(frozen=True)
class Blob:
    """One tissue region: points whose normalised radius ``rho`` around (cx, cy), with
    semi-axes (ax, ay), is below the outline ``1 + sum(a_n cos(n theta + phi_n))``. The
    outline is tabulated at ``_ANGLES`` angles; the table is its definition, so every
    test (pixel or rectangle) agrees."""

    cx: float
    cy: float
    ax: float
    ay: float
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]

    @cached_property
    def outline(self) -> np.ndarray:
        theta = np.arange(_ANGLES) * (2 * math.pi / _ANGLES)
        edge = np.ones(_ANGLES)
        for n, a, phi in zip(_HARMONICS, self.amplitudes, self.phases, strict=True):
            edge += a * np.cos(n * theta + phi)
        return edge

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether each level-0 point (xs, ys broadcast together) is inside."""
        u, v = (xs - self.cx) / self.ax, (ys - self.cy) / self.ay
        result: np.ndarray = np.hypot(u, v) < self.outline[_angle_index(np.arctan2(v, u))]
        return result

    def classify(self, x0: float, y0: float, x1: float, y1: float) -> int:
        """1 when the level-0 rectangle [x0, x1) x [y0, y1) is all inside, -1 when all
        outside, 0 when the outline may cross it."""
        u0, u1 = (x0 - self.cx) / self.ax, (x1 - self.cx) / self.ax
        v0, v1 = (y0 - self.cy) / self.ay, (y1 - self.cy) / self.ay
        near = math.hypot(min(max(0.0, u0), u1), min(max(0.0, v0), v1))
        far = math.hypot(max(abs(u0), abs(u1)), max(abs(v0), abs(v1)))
        if u0 <= 0 <= u1 and v0 <= 0 <= v1:
            low, high = float(self.outline.min()), float(self.outline.max())
        else:
            # The rectangle misses the centre, so it spans less than half a turn of angle:
            # its corners' angles about the middle one bound it.
            mid = math.atan2((v0 + v1) / 2, (u0 + u1) / 2)
            turns = [
                (math.atan2(v, u) - mid + math.pi) % (2 * math.pi) - math.pi
                for u in (u0, u1)
                for v in (v0, v1)
            ]
            first = math.floor((mid + min(turns)) * _ANGLES / (2 * math.pi)) - 1
            last = math.ceil((mid + max(turns)) * _ANGLES / (2 * math.pi)) + 1
            span = self.outline.take(np.arange(first, last + 1), mode="wrap")
            low, high = float(span.min()), float(span.max())
        if far < low - _SLACK:
            return 1
        if near > high + _SLACK:
            return -1
        return 0


def _angle_index(theta: np.ndarray) -> np.ndarray:
    """The outline table's entry nearest each angle (radians, any range)."""
    index: np.ndarray = np.rint(theta * (_ANGLES / (2 * math.pi))).astype(np.int64) % _ANGLES
    return index


def tissue_layout(
    width: int, height: int, tissue_fraction: float = 0.5, seed: int = 0
) -> list[Blob]:
    """The blobs of a ``width`` x ``height`` slide: one per cell of a row (or column) of
    near-square cells along its longer side, each covering ``tissue_fraction`` of its
    cell, with outlines and small offsets drawn from ``seed``."""
    if not 0.0 < tissue_fraction <= MAX_TISSUE_FRACTION:
        raise ValueError(f"tissue_fraction must be in (0, {MAX_TISSUE_FRACTION}]")
    rng = np.random.default_rng([seed, 7])
    count = max(1, min(4, round(max(width, height) / min(width, height))))
    horizontal = width >= height
    cw = width / count if horizontal else width
    ch = height if horizontal else height / count
    blobs = []
    for i in range(count):
        amps = rng.uniform(0.5, 1.0, len(_HARMONICS)) * _MAX_AMPLITUDE
        phases = tuple(float(p) for p in rng.uniform(0, 2 * math.pi, len(_HARMONICS)))
        # Area of the outline: pi * ax * ay * (1 + sum(a^2) / 2). Shrink the wobble
        # until the blob fits its cell at the asked-for area.
        for _ in range(20):
            t = math.sqrt(tissue_fraction / (math.pi * (1 + float(np.sum(amps**2)) / 2)))
            if t * (1 + float(amps.sum())) <= 0.5 - _MARGIN:
                break
            amps = amps * 0.7
        room = max(0.0, 0.5 - _MARGIN - t * (1 + float(amps.sum())))
        dx, dy = rng.uniform(-room, room, 2)
        ox, oy = (i * cw, 0.0) if horizontal else (0.0, i * ch)
        blobs.append(
            Blob(
                cx=ox + cw * (0.5 + dx),
                cy=oy + ch * (0.5 + dy),
                ax=cw * t,
                ay=ch * t,
                amplitudes=tuple(float(a) for a in amps),
                phases=phases,
            )
        )
    return blobs


def tissue_map(
    width: int,
    height: int,
    downsample: float,
    *,
    tissue_fraction: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Where the slide written with these arguments has tissue, one boolean per
    ``downsample`` level-0 pixels (tested at each cell's centre)."""
    blobs = tissue_layout(width, height, tissue_fraction, seed)
    xs = (np.arange(math.ceil(width / downsample)) + 0.5) * downsample
    ys = (np.arange(math.ceil(height / downsample)) + 0.5) * downsample
    out = np.zeros((len(ys), len(xs)), bool)
    for blob in blobs:
        out |= blob.contains(xs[None, :], ys[:, None])
    return out


def level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """The pyramid: level 0, then each level ``LEVEL_FACTOR`` times smaller, down to the
    first whose longer side is at most 512 px (always at least two levels)."""
    sizes = [(width, height)]
    while len(sizes) < 2 or max(sizes[-1]) > 512:
        ds = LEVEL_FACTOR ** len(sizes)
        sizes.append((max(1, width // ds), max(1, height // ds)))
    return sizes


def _load_cells(samples: Path) -> np.ndarray:
    """(V, CELL, CELL, 4) RGBA: every sample in its eight flips and rotations, a pixel
    packed in four bytes so that one uint32 gather moves a whole pixel."""
    files = sorted(samples.glob("synthetic_*.png"))
    if not files:
        raise FileNotFoundError(f"no synthetic_*.png in {samples} (the slide's tissue)")
    cells = np.zeros((8 * len(files), CELL, CELL, 4), np.uint8)
    for i, f in enumerate(files):
        img = np.asarray(Image.open(f).convert("RGB").resize((CELL, CELL)))
        for k in range(4):
            rotated = np.rot90(img, k)
            cells[8 * i + 2 * k, :, :, :3] = rotated
            cells[8 * i + 2 * k + 1, :, :, :3] = rotated[:, ::-1]
    return cells


class _Painter:
    """Tiles of any level, each a gather from the level's shrunk cells plus the blobs."""

    def __init__(self, blobs: list[Blob], cells: np.ndarray, seed: int) -> None:
        self.blobs, self.seed = blobs, seed
        self.count = len(cells)
        self._cells = cells
        self._levels: dict[float, tuple[int, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _atlas(self, ds: float) -> tuple[int, np.ndarray]:
        """The cells shrunk to one level (side ``side``), flattened to uint32 pixels."""
        with self._lock:  # painter threads share one atlas per level
            if ds not in self._levels:
                import cv2

                side = max(1, round(CELL / ds))
                shrunk = self._cells
                if side != CELL:
                    shrunk = np.empty((self.count, side, side, 4), np.uint8)
                    for cell, out in zip(self._cells, shrunk, strict=True):
                        cv2.resize(cell, (side, side), dst=out, interpolation=cv2.INTER_AREA)
                self._levels = {ds: (side, shrunk.view(np.uint32).reshape(-1))}
            return self._levels[ds]

    def _variant(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Which cell image sits at cell (cx, cy): a fixed hash of the cell and the seed."""
        h = (cx.astype(np.uint64) * np.uint64(0x9E3779B1)) ^ (
            cy.astype(np.uint64) * np.uint64(0x85EBCA77)
        )
        h ^= np.uint64((self.seed * 0xC2B2AE3D) & 0xFFFFFFFF)
        h = (h ^ (h >> np.uint64(15))) * np.uint64(0x2C1B3C6D)
        h ^= h >> np.uint64(12)
        return (h % np.uint64(self.count)).astype(np.int64)

    def tile(self, ds: float, tx: int, ty: int, size: int) -> np.ndarray:
        """The (size, size, 3) tile whose top-left pixel is (tx, ty) at downsample ``ds``."""
        # Level-0 footprint, to skip the blob test where a tile is all glass or all tissue.
        box = (tx * ds, ty * ds, (tx + size) * ds, (ty + size) * ds)
        kinds = [blob.classify(*box) for blob in self.blobs]
        if all(k < 0 for k in kinds):
            return np.broadcast_to(np.asarray(GLASS, np.uint8), (size, size, 3))
        side, atlas = self._atlas(ds)
        px = (np.arange(tx, tx + size) + 0.5) * ds  # level-0 pixel centres
        py = (np.arange(ty, ty + size) + 0.5) * ds
        cx, cy = (px // CELL).astype(np.int64), (py // CELL).astype(np.int64)
        lx = np.minimum(((px - cx * CELL) * side / CELL).astype(np.int64), side - 1)
        ly = np.minimum(((py - cy * CELL) * side / CELL).astype(np.int64), side - 1)
        ux, ix = np.unique(cx, return_inverse=True)
        uy, iy = np.unique(cy, return_inverse=True)
        variants = self._variant(ux[None, :], uy[:, None])[iy[:, None], ix[None, :]]
        index = (variants * side + ly[:, None]) * side + lx[None, :]
        rgb = atlas[index].view(np.uint8).reshape(size, size, 4)[:, :, :3]
        if not any(k > 0 for k in kinds):
            tissue = np.zeros((size, size), bool)
            for blob, kind in zip(self.blobs, kinds, strict=True):
                if kind == 0:
                    tissue |= blob.contains(px[None, :], py[:, None])
            rgb[~tissue] = GLASS
        return rgb

    def tiles(
        self, ds: float, level_w: int, level_h: int, size: int, pool: ThreadPoolExecutor
    ) -> Iterator[np.ndarray]:
        """A level's tiles in the row-major order TIFF stores them, painted on ``pool``
        a few tiles ahead of the encoder (which takes the other cores meanwhile)."""
        corners = ((tx, ty) for ty in range(0, level_h, size) for tx in range(0, level_w, size))
        ahead: deque[Future[np.ndarray]] = deque()
        for tx, ty in corners:
            ahead.append(pool.submit(self.tile, ds, tx, ty, size))
            if len(ahead) >= _AHEAD:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def write_synthetic_slide(
    path: Path,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    tissue_fraction: float = 0.5,
    seed: int = 0,
    fmt: SlideKind = "tiff",
    tile: int = 256,
    quality: int = 85,
    compression: Compression = "jpeg",
    samples: Path | None = None,
) -> Path:
    """Write a ``width`` x ``height`` pyramidal slide of synthetic liver tissue to
    ``path`` and return it.

    ``fmt="tiff"``: a generic tiled TIFF, every level in the main IFD chain, MPP in the
    resolution tags (pixels per centimetre), ``compression`` JPEG or zlib. ``fmt="svs"``:
    Aperio-like, JPEG tiles, MPP and magnification in the first page's description, and
    no label, macro or thumbnail page. Memory stays bounded (a few tiles and the sample
    cells) whatever the size."""
    if width < 1 or height < 1:
        raise ValueError(f"slide size {width}x{height} must be positive")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be positive, not {mpp}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, not {tile}")
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', not {fmt!r}")
    if fmt == "svs" and compression != "jpeg":
        raise ValueError("an SVS slide has JPEG tiles")
    cells = _load_cells(samples or REPO_ROOT / "samples")
    painter = _Painter(tissue_layout(width, height, tissue_fraction, seed), cells, seed)
    sizes = level_sizes(width, height)
    codec: dict[str, object] = (
        {"compression": "jpeg", "compressionargs": {"level": quality}}
        if compression == "jpeg"
        else {"compression": "zlib", "compressionargs": {"level": 6}}
    )
    head = (
        f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    )
    # A file past 4 GiB needs BigTIFF; JPEG tiles rarely get near, zlib ones may.
    bigtiff = width * height * 3 > 3 * 1024**3
    with (
        ThreadPoolExecutor(2, thread_name_prefix="paint") as pool,
        tifffile.TiffWriter(path, bigtiff=bigtiff) as tif,
    ):
        for level, (w, h) in enumerate(sizes):
            ds = float(LEVEL_FACTOR**level)
            extra: dict[str, object] = {}
            if fmt == "svs":
                extra["description"] = (
                    f"{head} JPEG/RGB Q={quality}|AppMag = {10 / mpp:g}|MPP = {mpp}"
                    if level == 0
                    else f"{head} -> {w}x{h}"
                )
            else:
                per_cm = 1e4 / (mpp * ds)
                extra.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
                extra["subfiletype"] = 1 if level else 0
            tif.write(
                painter.tiles(ds, w, h, tile, pool),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                metadata=None,
                # Two encoding threads, a few tiles buffered: bounded whatever the size.
                maxworkers=2,
                buffersize=16 * tile * tile * 3,
                **codec,  # type: ignore[arg-type]
                **extra,  # type: ignore[arg-type]
            )
    return path
