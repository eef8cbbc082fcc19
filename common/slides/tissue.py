"""Where the tissue is on a whole slide, and a small picture of it.

``compute_tissue_mask`` finds tissue at a coarse resolution (``TISSUE_MPP`` µm per mask
pixel, as TIAToolbox and MONAI do) so that tiling can skip bare glass. It reads the slide
in bounded chunks from the pyramid level nearest below the mask's resolution, so the
largest read does not grow with the slide. Tissue is what is clearly more saturated than
the glass: an Otsu threshold on the HSV saturation, floored so that a blank slide yields
no tissue, then a little morphology to drop specks. ``render_thumbnail`` reads the same
way. Only ``SlideReader``'s pixel API is used: no label, macro or scanner metadata.

OpenCV is imported inside the functions that need it: it comes with the ``worker`` extra,
and ``TissueMask`` and ``png_bytes`` stay usable without it."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from hepato.common.slides.reader import SlideReader

TISSUE_MPP = 8.0
# The most pixels of the read level that one read_region call asks for, per side: what
# bounds memory on a slide of any size.
READ_CHUNK_PX = 1024
# Saturation (0..255) below which nothing is tissue, whatever Otsu says: on a blank or
# near-uniform slide Otsu splits noise, and glass with a colour cast stays under this.
MIN_SATURATION = 15
# Pixels darker than this (HSV value, 0..255) are black padding, slide edges or pen; their
# hue and saturation are noise (a 10,0,0 pixel is "fully saturated").
MIN_VALUE = 30
# Connected regions smaller than this many mask pixels (8 µm each) are dust, not tissue.
MIN_COMPONENT_PX = 5


@dataclass(frozen=True, eq=False)  # eq=False: an array has no single truth value
class TissueMask:
    """Tissue (True) per mask pixel; one mask pixel spans ``downsample`` level-0 pixels in
    x and in y, mask pixel (i, j) covering level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds)."""

    mask: np.ndarray
    downsample: float

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, not of shape {mask.shape}")
        if not (math.isfinite(self.downsample) and self.downsample > 0):
            raise ValueError(f"downsample must be positive, not {self.downsample}")
        object.__setattr__(self, "mask", mask)

    @property
    def tissue_pixels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def area_fraction(self) -> float:
        """The share of mask pixels that are tissue, 0..1."""
        return self.tissue_pixels / self.mask.size if self.mask.size else 0.0

    def tissue_area_mm2(self, mpp: tuple[float, float]) -> float:
        """Tissue area in mm², given the slide's level-0 µm per pixel (x, y)."""
        px_x, px_y = self.downsample * mpp[0], self.downsample * mpp[1]
        return self.tissue_pixels * px_x * px_y / 1e6


def compute_tissue_mask(
    reader: SlideReader, mpp: tuple[float, float], target_mpp: float = TISSUE_MPP
) -> TissueMask:
    """The slide's tissue at ``target_mpp`` µm per mask pixel (never finer than level 0),
    ``mpp`` being the slide's level-0 µm per pixel (x, y)."""
    import cv2

    if not (mpp[0] > 0 and target_mpp > 0):
        raise ValueError(f"mpp {mpp[0]} and target_mpp {target_mpp} must be positive")
    ds = max(1.0, target_mpp / mpp[0])
    width, height = reader.dimensions
    out_w, out_h = math.ceil(width / ds), math.ceil(height / ds)
    # Saturation only, one byte per mask pixel: a third of the RGB picture's memory.
    sat = np.zeros((out_h, out_w), np.uint8)
    for ys, xs, rgb in _chunks(reader, ds, out_w, out_h):
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        s = hsv[:, :, 1]
        s[hsv[:, :, 2] < MIN_VALUE] = 0
        sat[ys, xs] = s
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    tissue: np.ndarray = (sat > max(otsu, MIN_SATURATION)).astype(np.uint8)
    # Close first so that a gland's pale lumen joins its walls, then open to drop
    # one-pixel specks; the kernel is 3 px (24 µm) so thin tissue survives.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_CLOSE, kernel)
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, kernel)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= MIN_COMPONENT_PX
    keep[0] = False  # label 0 is the background
    return TissueMask(mask=keep[labels], downsample=ds)


def render_thumbnail(reader: SlideReader, max_side: int = 1024) -> np.ndarray:
    """An RGB uint8 picture of the whole slide whose longer side is ``max_side`` pixels
    (or the slide's own size, never enlarged)."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, not {max_side}")
    width, height = reader.dimensions
    ds = max(1.0, max(width, height) / max_side)
    # The epsilon keeps float error from adding a column past max_side.
    out_w = max(1, min(max_side, math.ceil(width / ds - 1e-9)))
    out_h = max(1, min(max_side, math.ceil(height / ds - 1e-9)))
    out = np.full((out_h, out_w, 3), 255, np.uint8)
    for ys, xs, rgb in _chunks(reader, ds, out_w, out_h):
        out[ys, xs] = rgb
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit PNG of an RGB uint8 image, a grey uint8 image, or a boolean mask (0/255)."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        if arr.ndim != 2:
            raise ValueError(f"a mask is 2-D, not of shape {arr.shape}")
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected RGB or grey uint8 or a bool mask, not {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _chunks(
    reader: SlideReader, ds: float, out_w: int, out_h: int
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """The slide shrunk to one output pixel per ``ds`` level-0 pixels, piece by piece:
    (rows, columns, RGB piece). Each piece is read from the level nearest below ``ds``
    with at most READ_CHUNK_PX level pixels a side and shrunk by area averaging."""
    import cv2

    level = reader.best_level_for_downsample(ds)
    level_ds = reader.level_downsamples[level]
    r = ds / level_ds  # level pixels per output pixel, >= 1
    # ceil(b) - floor(a) <= ceil(b - a) + 1, so a piece of `step` output pixels needs at
    # most READ_CHUNK_PX level pixels.
    step = max(1, math.floor((READ_CHUNK_PX - 1) / r))
    for oy0 in range(0, out_h, step):
        oy1 = min(oy0 + step, out_h)
        ly0 = math.floor(oy0 * r)
        # Only when one output pixel spans more than a chunk (a target far coarser than
        # the pyramid's top) is its footprint cut: a sample, never an oversized read.
        ly1 = min(math.ceil(oy1 * r), ly0 + READ_CHUNK_PX)
        for ox0 in range(0, out_w, step):
            ox1 = min(ox0 + step, out_w)
            lx0 = math.floor(ox0 * r)
            lx1 = min(math.ceil(ox1 * r), lx0 + READ_CHUNK_PX)
            region = reader.read_region(
                level, round(lx0 * level_ds), round(ly0 * level_ds), lx1 - lx0, ly1 - ly0
            )
            shrunk = cv2.resize(region, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
            yield slice(oy0, oy1), slice(ox0, ox1), shrunk.reshape(oy1 - oy0, ox1 - ox0, 3)
