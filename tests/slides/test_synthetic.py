"""The synthetic slide writer: files the slide readers open as slides, with the pyramid,
MPP and tissue asked for, in memory that does not grow with the slide."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from hepato.common.slides.reader import open_slide
from hepato.common.slides.sniff import SlideFormat
from hepato.common.slides.synthetic import (
    GLASS,
    Compression,
    SlideKind,
    level_sizes,
    tissue_layout,
    tissue_map,
    write_synthetic_slide,
)
from hepato.common.slides.tissue import compute_tissue_mask


@pytest.mark.parametrize(
    ("fmt", "compression", "expected"),
    [
        ("svs", "jpeg", SlideFormat.APERIO_SVS),
        ("tiff", "jpeg", SlideFormat.GENERIC_TIFF),
        ("tiff", "zlib", SlideFormat.GENERIC_TIFF),
    ],
)
def test_the_slide_opens_with_its_size_levels_and_mpp(
    tmp_path: Path, fmt: SlideKind, compression: Compression, expected: SlideFormat
) -> None:
    path = write_synthetic_slide(
        tmp_path / f"s.{fmt}",
        2100,
        1300,
        mpp=0.25,
        fmt=fmt,
        compression=compression,
    )
    with open_slide(path) as reader:
        assert reader.format is expected
        assert reader.dimensions == (2100, 1300)
        assert reader.level_dimensions == tuple(level_sizes(2100, 1300))
        assert reader.level_count == 3  # 525 px is still over 512, 131 px is not
        assert reader.level_downsamples[1] == pytest.approx(4.0, rel=0.01)
        assert reader.mpp == pytest.approx((0.25, 0.25))


def test_a_large_slide_gets_levels_down_to_512_px() -> None:
    assert level_sizes(20000, 20000) == [(20000, 20000), (5000, 5000), (1250, 1250), (312, 312)]
    assert level_sizes(300, 200) == [(300, 200), (75, 50)]


def test_tissue_is_where_the_layout_says_and_covers_the_fraction_asked(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.svs", 3000, 3000, fmt="svs", seed=3)
    with open_slide(path) as reader:
        found = compute_tissue_mask(reader, (0.5, 0.5))
    expected = tissue_map(3000, 3000, found.downsample, seed=3)
    assert found.mask.shape == expected.shape
    assert (found.mask == expected).mean() > 0.97
    assert expected.mean() == pytest.approx(0.5, abs=0.02)
    assert found.area_fraction == pytest.approx(0.5, abs=0.05)


def test_tissue_is_the_samples_look_and_glass_is_bare(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.tiff", 2000, 2000)
    [blob] = tissue_layout(2000, 2000)
    with open_slide(path) as reader:
        inside = reader.read_region(0, round(blob.cx) - 160, round(blob.cy) - 160, 320, 320)
        corner = reader.read_region(0, 0, 0, 64, 64)
    saturation = cv2.cvtColor(inside, cv2.COLOR_RGB2HSV)[:, :, 1]
    assert np.median(saturation) > 40  # eosin pink, not glass
    assert inside.std() > 20  # nuclei, vacuoles, cell borders: texture, not a flat fill
    assert np.abs(corner.astype(int) - GLASS).max() <= 3  # JPEG of a flat colour


def test_the_tissue_fraction_and_the_slide_shape_set_the_blobs() -> None:
    assert len(tissue_layout(4000, 1000)) == 4
    assert len(tissue_layout(1000, 2000)) == 2
    for fraction in (0.2, 0.5, 0.7):
        got = tissue_map(4000, 2000, 8.0, tissue_fraction=fraction, seed=1).mean()
        assert got == pytest.approx(fraction, abs=0.02)
    with pytest.raises(ValueError):
        tissue_layout(100, 100, tissue_fraction=0.9)


def test_the_reduced_levels_show_the_same_picture(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.svs", 2048, 2048, fmt="svs")
    with open_slide(path) as reader:
        full = reader.read_region(0, 0, 0, 2048, 2048)
        small = reader.read_region(1, 0, 0, 512, 512)
    shrunk = cv2.resize(full, (512, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - small).mean() < 8


def test_the_same_seed_gives_the_same_slide(tmp_path: Path) -> None:
    a = write_synthetic_slide(tmp_path / "a.tiff", 900, 700, seed=5, compression="zlib")
    b = write_synthetic_slide(tmp_path / "b.tiff", 900, 700, seed=5, compression="zlib")
    c = write_synthetic_slide(tmp_path / "c.tiff", 900, 700, seed=6, compression="zlib")
    with open_slide(a) as ra, open_slide(b) as rb, open_slide(c) as rc:
        pa, pb, pc = (r.read_region(0, 0, 0, 900, 700) for r in (ra, rb, rc))
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def _peak_bytes(path: Path, side: int) -> int:
    tracemalloc.start()
    try:
        write_synthetic_slide(path, side, side, fmt="svs")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_slide(tmp_path: Path) -> None:
    small = _peak_bytes(tmp_path / "small.svs", 1024)
    large = _peak_bytes(tmp_path / "large.svs", 4096)  # 16 times the pixels
    # The sample cells and a few tiles in flight; a whole 4096 px level would be 48 MB.
    assert large < small * 1.3 + 4 * 1024**2, (small, large)
    assert large < 64 * 1024**2


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_synthetic_slide(tmp_path / "s.svs", 0, 100)
    with pytest.raises(ValueError):
        write_synthetic_slide(tmp_path / "s.svs", 100, 100, mpp=0)
    with pytest.raises(ValueError):
        write_synthetic_slide(tmp_path / "s.svs", 100, 100, fmt="svs", compression="zlib")
    with pytest.raises(FileNotFoundError):
        write_synthetic_slide(tmp_path / "s.svs", 100, 100, samples=tmp_path)
