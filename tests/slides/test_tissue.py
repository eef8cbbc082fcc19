"""The tissue mask and the thumbnail on synthetic slides: tissue where coloured squares
are and none on the glass, the black padding or a blank slide; the mask's size follows
the slide's; every read stays within the chunk limit, however large the slide, and the
chunking does not change the mask; areas and PNGs come out as computed."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from hepato.common.slides import SlideReader, open_slide
from hepato.common.slides import tissue as tissue_mod
from hepato.common.slides.grid import core_contains, plan_tiles
from hepato.common.slides.tissue import (
    TISSUE_MPP,
    TissueMask,
    compute_tissue_mask,
    png_bytes,
    render_thumbnail,
)
from tests.slides import make

MPP = 0.5
DS = TISSUE_MPP / MPP  # 16 level-0 px per mask px
WIDTH, HEIGHT = 4000, 3000  # not multiples of DS: the last mask row is half a pixel
# (x, y, size, RGB) at level 0: H&E-like pinks and purples.
SQUARES = (
    (400, 400, 800, (232, 150, 200)),
    (2400, 1600, 640, (120, 70, 170)),
    (3200, 400, 320, (200, 100, 150)),
)
PAD_X = 3800  # level-0 x from which the scanner padded with black
GLASS = (242, 240, 244)  # a faint colour cast, as real glass has


def _pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    out = [image]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        down = prev[: h * 2, : w * 2].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        out.append(down.round().astype(np.uint8))
    return out


def write_tiff(path: Path, image: np.ndarray, mpp: float = MPP, levels: int = 3) -> Path:
    """A generic tiled pyramidal TIFF (deflate, lossless) of ``image`` at ``mpp``."""
    per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate(_pyramid(image, levels)):
            tif.write(
                lv,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                resolution=(per_cm / 2**i, per_cm / 2**i),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
    return path


def _glass(width: int, height: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 1.5, (height, width, 3))
    return np.clip(np.array(GLASS) + noise, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = _glass(WIDTH, HEIGHT)
    for x, y, size, colour in SQUARES:
        img[y : y + size, x : x + size] = colour
    img[:, PAD_X:] = 0
    return write_tiff(tmp_path_factory.mktemp("tissue") / "tissue.tiff", img)


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = _glass(1500, 1000, seed=1)
    return write_tiff(tmp_path_factory.mktemp("blank") / "blank.tiff", img)


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """Every read_region call as (level, width, height)."""
    calls: list[tuple[int, int, int]] = []
    original = SlideReader.read_region

    def recording(self: SlideReader, level: int, x: int, y: int, w: int, h: int) -> Any:
        calls.append((level, w, h))
        return original(self, level, x, y, w, h)

    monkeypatch.setattr(SlideReader, "read_region", recording)
    yield calls


def _mask_box(x: int, y: int, size: int) -> tuple[slice, slice]:
    return slice(math.floor(y / DS), math.ceil((y + size) / DS)), slice(
        math.floor(x / DS), math.ceil((x + size) / DS)
    )


def test_tissue_where_the_squares_are_and_nowhere_else(tissue_slide: Path) -> None:
    with open_slide(tissue_slide) as slide:
        mask = compute_tissue_mask(slide, (MPP, MPP))
    assert mask.downsample == DS
    m = mask.mask
    assert m.dtype == bool
    near = np.zeros_like(m)
    for x, y, size, _ in SQUARES:
        rows, cols = _mask_box(x, y, size)
        # Every mask pixel wholly inside the square is tissue...
        assert m[rows.start + 1 : rows.stop - 1, cols.start + 1 : cols.stop - 1].all()
        near[rows.start - 1 : rows.stop + 1, cols.start - 1 : cols.stop + 1] = True
    # ...and nothing away from them: not the wide empty glass, not the black padding.
    assert not m[~near].any()
    assert not m[:, math.floor(PAD_X / DS) :].any()
    inside = sum(size * size for *_, size, _ in SQUARES) / DS**2
    # The opening's 3 px ellipse (a cross) rounds off each square's corner pixels.
    assert inside * 0.99 <= mask.tissue_pixels <= inside * 1.3
    assert mask.area_fraction == pytest.approx(mask.tissue_pixels / m.size)


def test_the_mask_shape_follows_the_slide(tissue_slide: Path, blank_slide: Path) -> None:
    with open_slide(tissue_slide) as slide:
        assert compute_tissue_mask(slide, (MPP, MPP)).mask.shape == (
            math.ceil(HEIGHT / DS),
            math.ceil(WIDTH / DS),
        )
        coarse = compute_tissue_mask(slide, (MPP, MPP), target_mpp=4.0)
        assert coarse.downsample == 8.0
        assert coarse.mask.shape == (math.ceil(HEIGHT / 8), math.ceil(WIDTH / 8))
    with open_slide(blank_slide) as slide:
        # A target finer than the slide is never upsampled: one mask px per level-0 px.
        fine = compute_tissue_mask(slide, (MPP, MPP), target_mpp=0.25)
        assert fine.downsample == 1.0
        assert fine.mask.shape == (1000, 1500)


def test_a_blank_slide_has_no_tissue(blank_slide: Path) -> None:
    with open_slide(blank_slide) as slide:
        mask = compute_tissue_mask(slide, (MPP, MPP))
    assert mask.mask.shape == (math.ceil(1000 / DS), math.ceil(1500 / DS))
    assert mask.tissue_pixels == 0
    assert mask.area_fraction == 0.0
    assert mask.tissue_area_mm2((MPP, MPP)) == 0.0


@pytest.mark.parametrize(
    "writer",
    [
        lambda d: make.write_svs(d / "s.svs"),
        lambda d: make.write_generic_tiff(d / "g.tiff"),
        lambda d: make.write_ome_tiff(d / "o.ome.tif"),
    ],
    ids=["svs", "generic", "ome"],
)
def test_the_squares_of_every_format_are_found(tmp_path: Path, writer: Any) -> None:
    with open_slide(writer(tmp_path)) as slide:
        assert slide.mpp is not None
        mask = compute_tissue_mask(slide, slide.mpp)
    for x, y, size, _ in make.SQUARES:
        cx, cy = x + size // 2, y + size // 2
        assert mask.mask[int(cy / mask.downsample), int(cx / mask.downsample)]
    assert not mask.mask[0, 0] and not mask.mask[-1, 0] and not mask.mask[0, -1]


def test_reads_stay_within_the_chunk_limit(
    tissue_slide: Path,
    blank_slide: Path,
    reads: list[tuple[int, int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open_slide(tissue_slide) as slide:
        whole = compute_tissue_mask(slide, (MPP, MPP))
        assert max(max(w, h) for _, w, h in reads) <= tissue_mod.READ_CHUNK_PX
        # From the level nearest below the mask's resolution, never level 0.
        assert {level for level, _, _ in reads} == {slide.best_level_for_downsample(DS)} == {2}
        reads.clear()
        limit = 100
        monkeypatch.setattr(tissue_mod, "READ_CHUNK_PX", limit)
        chunked = compute_tissue_mask(slide, (MPP, MPP))
        big = list(reads)
    assert len(big) > 50
    assert max(max(w, h) for _, w, h in big) <= limit
    # Level 2 is 4 px per mask px: the chunks fall on mask pixels and change nothing.
    np.testing.assert_array_equal(chunked.mask, whole.mask)
    # The bound is the chunk, not the slide: the same for a slide a sixth of the size.
    reads.clear()
    with open_slide(blank_slide) as slide:
        compute_tissue_mask(slide, (MPP, MPP))
        render_thumbnail(slide, max_side=512)
    assert max(max(w, h) for _, w, h in reads) <= limit


def test_one_mask_pixel_wider_than_a_chunk_is_sampled_not_read_whole(
    blank_slide: Path, reads: list[tuple[int, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tissue_mod, "READ_CHUNK_PX", 64)
    with open_slide(blank_slide) as slide:
        # 800 µm a mask px: 400 level-2 px a side, more than a chunk.
        mask = compute_tissue_mask(slide, (MPP, MPP), target_mpp=800.0)
    assert mask.mask.shape == (1, 1)
    assert max(max(w, h) for _, w, h in reads) <= 64


def test_thumbnail(tissue_slide: Path, reads: list[tuple[int, int, int]]) -> None:
    with open_slide(tissue_slide) as slide:
        thumb = render_thumbnail(slide, max_side=1024)
        small = render_thumbnail(slide, max_side=100)
    assert thumb.dtype == np.uint8
    assert thumb.shape == (768, 1024, 3)
    assert small.shape == (75, 100, 3)
    assert max(max(w, h) for _, w, h in reads) <= tissue_mod.READ_CHUNK_PX
    scale = 1024 / WIDTH
    for x, y, size, colour in SQUARES:
        cx, cy = int((x + size / 2) * scale), int((y + size / 2) * scale)
        np.testing.assert_allclose(thumb[cy, cx], colour, atol=2)
    np.testing.assert_allclose(thumb[5, 5], GLASS, atol=4)
    assert (thumb[:, int(PAD_X * scale) + 2 :] < 3).all()


def test_a_thumbnail_is_never_enlarged(blank_slide: Path) -> None:
    with open_slide(blank_slide) as slide:
        assert render_thumbnail(slide, max_side=4096).shape == (1000, 1500, 3)


def test_the_mask_plans_tiles_over_the_tissue(tissue_slide: Path) -> None:
    with open_slide(tissue_slide) as slide:
        mask = compute_tissue_mask(slide, (MPP, MPP))
    tiles = plan_tiles(WIDTH, HEIGHT, (MPP, MPP), 1.0, 128, 16, mask)
    full = plan_tiles(WIDTH, HEIGHT, (MPP, MPP), 1.0, 128, 16, None)
    assert 0 < len(tiles) < len(full) / 3
    for x, y, size, _ in SQUARES:
        for cx, cy in [(x, y), (x + size - 1, y + size - 1), (x + size / 2, y + size / 2)]:
            assert sum(core_contains(t, cx, cy) for t in tiles) == 1


def test_tissue_area_arithmetic() -> None:
    m = np.zeros((20, 30), bool)
    m[2:4, 5:10] = True  # 10 px
    mask = TissueMask(m, downsample=16.0)
    assert mask.tissue_pixels == 10
    assert mask.area_fraction == pytest.approx(10 / 600)
    # Each mask px is (16 * 0.5) x (16 * 0.25) µm = 32 µm²; 10 of them are 320e-6 mm².
    assert mask.tissue_area_mm2((0.5, 0.25)) == pytest.approx(10 * 8.0 * 4.0 / 1e6)
    assert TissueMask(np.zeros((0, 0), bool), 8.0).area_fraction == 0.0


def test_a_tissue_mask_is_checked() -> None:
    with pytest.raises(ValueError, match="2-D"):
        TissueMask(np.zeros((2, 2, 2), bool), 1.0)
    with pytest.raises(ValueError, match="downsample"):
        TissueMask(np.zeros((2, 2), bool), 0.0)
    assert TissueMask(np.array([[0, 3]]), 1.0).mask.dtype == bool


def test_png_bytes() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(png_bytes(rgb)))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgb)
    m = np.zeros((5, 7), bool)
    m[1:3, 2:4] = True
    decoded = Image.open(io.BytesIO(png_bytes(m)))
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), m.astype(np.uint8) * 255)
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 4), np.uint8))
