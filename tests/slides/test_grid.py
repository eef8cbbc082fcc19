"""The tile grid: the cores of a full grid partition the slide and meet at the middle of
each overlap, neighbours overlap by exactly the level-0 overlap, tiles whose core holds no
tissue are dropped (and the kept ones keep their cores), sizes follow the MPP ratio, and
bad overlaps are refused."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from hepato.common.slides.grid import Tile, core_contains, plan_tiles
from hepato.common.slides.tissue import TissueMask

# (width, height, slide_mpp, model_mpp, tile_px, overlap_px): integer and fractional
# downsamples, odd overlaps, anisotropic pixels, no overlap, edges on and off the stride.
Grid = tuple[int, int, tuple[float, float], float, int, int]
GRIDS: list[Grid] = [
    (1000, 700, (0.5, 0.5), 1.0, 128, 20),
    (1000, 700, (0.25, 0.25), 0.5, 100, 33),
    (1234, 987, (0.2527, 0.2527), 0.5, 64, 7),
    (900, 500, (0.25, 0.5), 0.5, 96, 16),
    (768, 512, (0.5, 0.5), 0.5, 256, 0),
    (1793, 1025, (0.5, 0.5), 0.5, 256, 1),
]


def _cores(tiles: list[Tile]) -> np.ndarray:
    return np.array([(t.core_x0, t.core_y0, t.core_x1, t.core_y1) for t in tiles])


def _level0(size: int, slide_mpp: float, model_mpp: float) -> int:
    return round(size * model_mpp / slide_mpp)


@pytest.mark.parametrize("grid", GRIDS)
def test_cores_partition_the_slide(grid: Grid) -> None:
    width, height = grid[0], grid[1]
    tiles = plan_tiles(*grid, mask=None)
    cores = _cores(tiles)
    assert (cores[:, 2] > cores[:, 0]).all() and (cores[:, 3] > cores[:, 1]).all()
    areas = (cores[:, 2] - cores[:, 0]) * (cores[:, 3] - cores[:, 1])
    assert int(areas.sum()) == width * height
    for a, b in itertools.combinations(tiles, 2):
        disjoint_x = a.core_x1 <= b.core_x0 or b.core_x1 <= a.core_x0
        disjoint_y = a.core_y1 <= b.core_y0 or b.core_y1 <= a.core_y0
        assert disjoint_x or disjoint_y, (a, b)
    rng = np.random.default_rng(0)
    points = rng.uniform((0, 0), (width, height), size=(3000, 2))
    # The corners and edges of the slide too, where rounding would bite.
    edges = [(0, 0), (width - 1e-6, height - 1e-6), (0, height - 0.5), (width - 0.5, 0)]
    for cx, cy in [*points.tolist(), *edges]:
        assert sum(core_contains(t, cx, cy) for t in tiles) == 1, (cx, cy)
    assert not any(core_contains(t, width, 0) or core_contains(t, 0, height) for t in tiles)


@pytest.mark.parametrize("grid", GRIDS)
def test_neighbours_overlap_by_ov0_and_cores_meet_mid_overlap(grid: Grid) -> None:
    width, height, slide_mpp, model_mpp, tile_px, overlap_px = grid
    tiles = plan_tiles(*grid, mask=None)
    by_pos = {(t.x, t.y): t for t in tiles}
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    assert len(by_pos) == len(xs) * len(ys) == len(tiles)
    for axis, starts, mpp in (("x", xs, slide_mpp[0]), ("y", ys, slide_mpp[1])):
        size = _level0(tile_px, mpp, model_mpp)
        ov0 = _level0(overlap_px, mpp, model_mpp)
        assert starts[0] == 0
        assert np.diff(starts).tolist() == [size - ov0] * (len(starts) - 1)
        length = width if axis == "x" else height
        # As few tiles as cover the slide: the last reaches the edge, the one before not.
        assert starts[-1] + size >= length
        assert len(starts) == 1 or starts[-2] + size < length
    ov0x = _level0(overlap_px, slide_mpp[0], model_mpp)
    ov0y = _level0(overlap_px, slide_mpp[1], model_mpp)
    for t in tiles:
        assert t.x <= t.core_x0 < t.core_x1 <= t.x + t.w
        assert t.y <= t.core_y0 < t.core_y1 <= t.y + t.h
        right = by_pos.get((t.x + t.w - ov0x, t.y))
        if right is not None:
            assert t.x + t.w - right.x == ov0x  # the read rectangles overlap by ov0
            assert t.core_x1 == right.core_x0 == right.x + ov0x // 2
            assert (t.core_y0, t.core_y1) == (right.core_y0, right.core_y1)
        below = by_pos.get((t.x, t.y + t.h - ov0y))
        if below is not None:
            assert t.y + t.h - below.y == ov0y
            assert t.core_y1 == below.core_y0 == below.y + ov0y // 2
    # The outer cores run to the slide's edges.
    assert min(t.core_x0 for t in tiles) == 0 and max(t.core_x1 for t in tiles) == width
    assert min(t.core_y0 for t in tiles) == 0 and max(t.core_y1 for t in tiles) == height


def test_row_major_order() -> None:
    tiles = plan_tiles(1000, 700, (0.5, 0.5), 1.0, 128, 20, mask=None)
    assert [(t.y, t.x) for t in tiles] == sorted((t.y, t.x) for t in tiles)


@pytest.mark.parametrize(
    ("slide_mpp", "model_mpp", "tile_px", "overlap_px", "expected"),
    [
        ((0.25, 0.25), 0.5, 512, 64, (1024, 1024, 128, 128)),
        ((0.5, 0.5), 0.5, 512, 64, (512, 512, 64, 64)),
        ((0.25, 0.5), 0.5, 512, 64, (1024, 512, 128, 64)),
        ((0.2527, 0.2527), 0.5, 512, 32, (1013, 1013, 63, 63)),
        ((1.0, 1.0), 0.5, 512, 64, (256, 256, 32, 32)),
    ],
)
def test_level0_sizes_follow_the_mpp_ratio(
    slide_mpp: tuple[float, float],
    model_mpp: float,
    tile_px: int,
    overlap_px: int,
    expected: tuple[int, int, int, int],
) -> None:
    w0, h0, ov0x, ov0y = expected
    assert w0 == round(tile_px * model_mpp / slide_mpp[0])
    tiles = plan_tiles(5000, 4000, slide_mpp, model_mpp, tile_px, overlap_px, mask=None)
    assert {(t.w, t.h) for t in tiles} == {(w0, h0)}
    assert sorted({t.x for t in tiles})[1] == w0 - ov0x
    assert sorted({t.y for t in tiles})[1] == h0 - ov0y


def test_a_slide_smaller_than_one_tile_gives_one_tile() -> None:
    tiles = plan_tiles(300, 200, (0.25, 0.25), 0.5, 512, 64, mask=None)
    assert tiles == [Tile(0, 0, 1024, 1024, 0, 0, 300, 200)]
    # Exactly one tile's size is still one tile.
    tiles = plan_tiles(1024, 1024, (0.25, 0.25), 0.5, 512, 64, mask=None)
    assert tiles == [Tile(0, 0, 1024, 1024, 0, 0, 1024, 1024)]
    assert len(plan_tiles(1025, 1, (0.25, 0.25), 0.5, 512, 64, mask=None)) == 2


@pytest.mark.parametrize("overlap_px", [512, 600, -1])
def test_an_overlap_not_below_the_tile_is_refused(overlap_px: int) -> None:
    with pytest.raises(ValueError, match="overlap_px"):
        plan_tiles(5000, 4000, (0.25, 0.25), 0.5, 512, overlap_px, mask=None)


def test_a_stride_that_rounds_to_nothing_is_refused() -> None:
    # 10 px tiles overlapping by 9 at a downsample of 0.1 both round to 1 level-0 px.
    with pytest.raises(ValueError, match="stride"):
        plan_tiles(100, 100, (5.0, 5.0), 0.5, 10, 9, mask=None)


@pytest.mark.parametrize("bad", [(0, 10), (10, 0)])
def test_an_empty_slide_is_refused(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="slide size"):
        plan_tiles(*bad, (0.5, 0.5), 0.5, 256, 0, mask=None)


def test_tiles_without_tissue_in_their_core_are_dropped() -> None:
    width, height = 1000, 700
    full = plan_tiles(width, height, (0.5, 0.5), 1.0, 128, 20, mask=None)
    # One tissue pixel (mask ds 10) well inside the core of one tile.
    target = full[len(full) // 2]
    m = np.zeros((70, 100), bool)
    cx, cy = (target.core_x0 + target.core_x1) // 2, (target.core_y0 + target.core_y1) // 2
    m[cy // 10, cx // 10] = True
    kept = plan_tiles(width, height, (0.5, 0.5), 1.0, 128, 20, TissueMask(m, 10.0))
    assert kept == [target]
    # No tissue at all: nothing to read.
    empty = TissueMask(np.zeros((70, 100), bool), 10.0)
    assert plan_tiles(width, height, (0.5, 0.5), 1.0, 128, 20, empty) == []
    # All tissue: the full grid.
    everywhere = TissueMask(np.ones((70, 100), bool), 10.0)
    assert plan_tiles(width, height, (0.5, 0.5), 1.0, 128, 20, everywhere) == full


def test_a_tissue_pixel_straddling_a_core_boundary_keeps_both_tiles() -> None:
    # ds 2, stride 216, ov0 40: the first column boundary is at 216 + 20 = 236, inside
    # mask pixel 23 (level-0 230..240) of a mask with ds 10.
    full = plan_tiles(1000, 200, (0.5, 0.5), 1.0, 128, 20, mask=None)
    assert [t.core_x1 for t in full[:1]] == [236]
    m = np.zeros((20, 100), bool)
    m[5, 23] = True
    kept = plan_tiles(1000, 200, (0.5, 0.5), 1.0, 128, 20, TissueMask(m, 10.0))
    assert kept == full[:2]
    # Mask pixel 24 (240..250) lies wholly in the second core only.
    m[5, 23], m[5, 24] = False, True
    assert plan_tiles(1000, 200, (0.5, 0.5), 1.0, 128, 20, TissueMask(m, 10.0)) == full[1:2]


@pytest.mark.parametrize("seed", range(6))
def test_the_tissue_test_matches_a_brute_force_check(seed: int) -> None:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(500, 3000)), int(rng.integers(500, 3000))
    ds = float(rng.choice([1.0, 4.0, 7.3, 16.0, 31.7]))
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    m = rng.random(shape) < rng.choice([0.0005, 0.005, 0.05])
    tile_px = int(rng.integers(32, 200))
    grid: Grid = (width, height, (0.5, 0.5), 1.0, tile_px, int(rng.integers(0, tile_px)))
    full = plan_tiles(*grid, mask=None)
    expected = []
    for t in full:
        y0, y1 = math.floor(t.core_y0 / ds), math.ceil(t.core_y1 / ds)
        x0, x1 = math.floor(t.core_x0 / ds), math.ceil(t.core_x1 / ds)
        if m[y0:y1, x0:x1].any():
            expected.append(t)
    assert plan_tiles(*grid, mask=TissueMask(m, ds)) == expected


def test_a_mask_smaller_than_the_slide_keeps_nothing_past_it() -> None:
    m = np.ones((10, 10), bool)  # covers level-0 0..100 only
    tiles = plan_tiles(1000, 1000, (0.5, 0.5), 0.5, 100, 0, TissueMask(m, 10.0))
    assert tiles == [Tile(0, 0, 100, 100, 0, 0, 100, 100)]


def test_core_contains_is_half_open() -> None:
    t = Tile(0, 0, 100, 100, 10, 20, 50, 60)
    assert core_contains(t, 10, 20)
    assert core_contains(t, 49.999, 59.999)
    assert not core_contains(t, 50, 30)
    assert not core_contains(t, 30, 60)
    assert not core_contains(t, 9.999, 30)


def test_a_grid_of_100k_tiles_is_planned_vectorised() -> None:
    # 320 x 320 tiles of 1024 level-0 px (stride 896) over a 4481 x 4481 px mask.
    width = height = 896 * 319 + 1024
    ds = 64.0
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    m = np.zeros(shape, bool)
    m[::37, ::41] = True
    tiles = plan_tiles(width, height, (0.25, 0.25), 0.5, 512, 64, TissueMask(m, ds))
    full = plan_tiles(width, height, (0.25, 0.25), 0.5, 512, 64, mask=None)
    assert len(full) == 320 * 320
    assert 0 < len(tiles) < len(full)
    assert full[-1].core_x1 == width and full[-1].core_y1 == height
    assert all(type(v) is int for v in dataclasses.astuple(tiles[-1]))
