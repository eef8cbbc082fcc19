"""Deep Zoom math and tiles against OpenSlide's own DeepZoomGenerator: the same levels,
level sizes, tile grids and tile sizes, and tiles that look the same."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from hepato.common.slides import deepzoom
from hepato.common.slides.reader import SlideReader, open_slide
from tests.slides import make, planted

# Mean absolute difference (0..255) allowed between our tile and OpenSlide's: the
# filters differ (box here, Lanczos there) and ours went through JPEG at quality 80.
MEAN_DIFF = 6.0


class FakeSlide:
    """Just what DeepZoomGenerator reads of a slide to do its arithmetic."""

    def __init__(self, width: int, height: int) -> None:
        self.dimensions = (width, height)
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, str] = {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return 0


def decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"), np.int16)


def every_tile(generator: DeepZoomGenerator) -> list[tuple[int, int, int]]:
    return [
        (level, col, row)
        for level, (cols, rows) in enumerate(generator.level_tiles)
        for col in range(cols)
        for row in range(rows)
    ]


@pytest.mark.parametrize(
    "size",
    [(1, 1), (2, 1), (1, 3), (254, 254), (255, 100), (256, 256), (1024, 1), (1025, 7),
     (2304, 1536), (98_304, 61_441), (100_000, 3)],
)  # fmt: skip
def test_the_grid_is_openslides(size: tuple[int, int]) -> None:
    w, h = size
    reference = DeepZoomGenerator(FakeSlide(w, h))  # type: ignore[arg-type]
    assert deepzoom.level_count(w, h) == reference.level_count
    for level in range(reference.level_count):
        assert deepzoom.level_dimensions(w, h, level) == reference.level_dimensions[level]
        assert deepzoom.level_tiles(w, h, level) == reference.level_tiles[level]
        cols, rows = reference.level_tiles[level]
        # The corners and one inside: every case of overlap on either side.
        for col in sorted({0, cols // 2, cols - 1}):
            for row in sorted({0, rows // 2, rows - 1}):
                x, y, tw, th = deepzoom.tile_rect(w, h, level, col, row)
                assert (tw, th) == reference.get_tile_dimensions(level, (col, row))
                (x0, y0), _, _ = reference.get_tile_coordinates(level, (col, row))
                ds = deepzoom.level_downsample(w, h, level)
                assert (x * ds, y * ds) == (x0, y0)


def test_the_descriptor_is_openslides(tmp_path: Path) -> None:
    path = planted.write_svs(tmp_path / "slide.svs")
    with openslide.OpenSlide(str(path)) as slide:
        ours = ET.fromstring(deepzoom.descriptor_xml(*slide.dimensions))
        theirs = ET.fromstring(DeepZoomGenerator(slide).get_dzi("jpeg"))
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert ours.tag == theirs.tag == f"{ns}Image"
    assert ours.attrib == theirs.attrib
    assert ours.attrib == {"TileSize": "254", "Overlap": "1", "Format": "jpeg"}
    assert ours.find(f"{ns}Size").attrib == theirs.find(f"{ns}Size").attrib  # type: ignore[union-attr]
    assert ours.find(f"{ns}Size").attrib == {"Width": "2304", "Height": "1536"}  # type: ignore[union-attr]


@pytest.mark.parametrize("write", [make.write_svs, planted.write_svs], ids=["make", "planted"])
def test_tiles_match_openslides(tmp_path: Path, write: Any) -> None:
    path = write(tmp_path / "slide.svs")
    diffs = []
    with openslide.OpenSlide(str(path)) as slide, open_slide(path) as reader:
        reference = DeepZoomGenerator(slide)
        assert deepzoom.level_count(*reader.dimensions) == reference.level_count
        for level, col, row in every_tile(reference):
            ours = decode(deepzoom.render_tile(reader, level, col, row))
            size = reference.get_tile_dimensions(level, (col, row))
            assert (ours.shape[1], ours.shape[0]) == size, (level, col, row)
            theirs = np.asarray(reference.get_tile(level, (col, row)).convert("RGB"), np.int16)
            if theirs.shape != ours.shape:
                # get_tile shrinks with Image.thumbnail, which keeps the aspect ratio and
                # can come out a pixel short of the size the generator itself declares
                # (a 576x384 region to 2x1 gives 1x1); ours is the declared size.
                assert abs(theirs.shape[0] - ours.shape[0]) <= 1
                assert abs(theirs.shape[1] - ours.shape[1]) <= 1
                continue
            diff = float(np.abs(ours - theirs).mean())
            assert diff < 3 * MEAN_DIFF, (level, col, row, diff)
            diffs.append(diff)
    assert float(np.mean(diffs)) < MEAN_DIFF


def test_a_tiffslide_slide_gives_the_same_tiles(tmp_path: Path) -> None:
    """An OME-TIFF (read by tiffslide) and an SVS (OpenSlide) of one picture."""
    with (
        open_slide(make.write_ome_tiff(tmp_path / "slide.ome.tiff")) as ome,
        open_slide(make.write_svs(tmp_path / "slide.svs")) as svs,
    ):
        assert ome.dimensions == svs.dimensions
        w, h = ome.dimensions
        top = deepzoom.level_count(w, h) - 1
        for level in (top, top - 1, top - 3, 0):
            cols, rows = deepzoom.level_tiles(w, h, level)
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                a = decode(deepzoom.render_tile(ome, level, col, row))
                b = decode(deepzoom.render_tile(svs, level, col, row))
                _, _, tw, th = deepzoom.tile_rect(w, h, level, col, row)
                assert a.shape == b.shape == (th, tw, 3)
                assert float(np.abs(a - b).mean()) < MEAN_DIFF


def test_a_tile_is_read_at_the_level_above_its_resolution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    read_region = SlideReader.read_region

    def counting(self: SlideReader, level: int, *args: int) -> np.ndarray:
        reads.append(level)
        return read_region(self, level, *args)

    monkeypatch.setattr(SlideReader, "read_region", counting)
    with open_slide(planted.write_tiff(tmp_path / "slide.tiff")) as reader:
        w, h = reader.dimensions
        top = deepzoom.level_count(w, h) - 1
        # Downsamples 1, 2, 4 are the pyramid's; 8 and more are read at 4 and shrunk.
        for level in (top, top - 1, top - 2, top - 3, 0):
            deepzoom.render_tile(reader, level, 0, 0)
    assert reads == [0, 1, 2, 2, 2]


def test_out_of_range_is_named(tmp_path: Path) -> None:
    w, h = 2304, 1536
    top = deepzoom.level_count(w, h) - 1
    assert top == 12
    cols, rows = deepzoom.level_tiles(w, h, top)
    assert (cols, rows) == (10, 7)
    with pytest.raises(ValueError, match=r"level 13 out of range \(0\.\.12\)"):
        deepzoom.tile_rect(w, h, 13, 0, 0)
    with pytest.raises(ValueError, match="level -1"):
        deepzoom.level_dimensions(w, h, -1)
    with pytest.raises(ValueError, match=r"tile column 10 out of range at level 12 \(0\.\.9\)"):
        deepzoom.tile_rect(w, h, top, 10, 0)
    with pytest.raises(ValueError, match=r"tile row 7 out of range at level 12 \(0\.\.6\)"):
        deepzoom.tile_rect(w, h, top, 0, 7)
    reader = open_slide(planted.write_tiff(tmp_path / "slide.tiff"))
    with reader, pytest.raises(ValueError, match="tile row -1"):
        deepzoom.render_tile(reader, top, 0, -1)


def test_the_tile_cache_keeps_the_recent_within_its_bytes() -> None:
    cache = deepzoom.TileCache(max_bytes=30)
    cache.put("a", b"x" * 10)
    cache.put("b", b"y" * 10)
    cache.put("c", b"z" * 10)
    assert cache.get("a") == b"x" * 10  # now the most recent
    cache.put("d", b"w" * 10)
    assert cache.get("b") is None and len(cache) == 3
    assert cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", b"h" * 31)
    assert cache.get("huge") is None and len(cache) == 3
    cache.put("a", b"x" * 25)  # replaced: the old size is given back
    assert cache.get("a") == b"x" * 25 and len(cache) == 1
