"""The slide readers on synthetic slides of every tested format: the format is sniffed
from the bytes, levels and MPP are read, regions hold the planted squares at level 0 and
at a reduced level, patient text never leaves the reader, and non-slides and truncated
slides are refused with a reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest

from hepato.common.exceptions import InvalidSlide, TruncatedSlide, UnsupportedSlideFormat
from hepato.common.slides import SlideFormat, SlideReader, open_slide, sniff_slide
from tests.slides import make

WRITERS: dict[str, tuple[Callable[[Path], Path], SlideFormat, str, float]] = {
    "svs": (lambda d: make.write_svs(d / "slide.svs"), SlideFormat.APERIO_SVS, "aperio", 0.25),
    "generic": (
        lambda d: make.write_generic_tiff(d / "slide.tiff"),
        SlideFormat.GENERIC_TIFF,
        "generic-tiff",
        make.GENERIC_MPP,
    ),
    "ome": (
        lambda d: make.write_ome_tiff(d / "slide.ome.tif"),
        SlideFormat.OME_TIFF,
        "ome-tiff",
        make.OME_MPP,
    ),
    "dicom": (lambda d: make.write_dicom(d / "dicom"), SlideFormat.DICOM, "dicom", make.DICOM_MPP),
}
# JPEG tiles blur colours a little; deflate tiles are exact.
TOLERANCE = 12


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    return {name: writer(root) for name, (writer, *_) in WRITERS.items()}


@pytest.mark.parametrize("name", WRITERS)
def test_format_is_sniffed_from_the_bytes(
    slides: dict[str, Path], tmp_path: Path, name: str
) -> None:
    fmt = WRITERS[name][1]
    assert sniff_slide(slides[name]).format is fmt
    # The name plays no part: the same bytes under a misleading name sniff the same.
    if name != "dicom":
        renamed = tmp_path / "upload.png"
        renamed.write_bytes(slides[name].read_bytes())
        assert sniff_slide(renamed).format is fmt


@pytest.mark.parametrize("name", WRITERS)
def test_levels_and_mpp(slides: dict[str, Path], name: str) -> None:
    _, fmt, vendor, mpp = WRITERS[name]
    with open_slide(slides[name]) as slide:
        assert slide.format is fmt
        assert slide.vendor == vendor
        assert slide.level_count == make.LEVELS
        assert slide.dimensions == (make.WIDTH, make.HEIGHT)
        assert slide.level_dimensions == tuple(
            (make.WIDTH // 2**i, make.HEIGHT // 2**i) for i in range(make.LEVELS)
        )
        assert slide.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
        assert slide.mpp == pytest.approx((mpp, mpp))
        assert slide.best_level_for_downsample(1.0) == 0
        assert slide.best_level_for_downsample(3.0) == 1
        assert slide.best_level_for_downsample(64.0) == make.LEVELS - 1


def _square_centres() -> list[tuple[int, int, tuple[int, int, int]]]:
    """Level-0 (x, y) of a patch well inside each square, away from JPEG edge blur."""
    return [(x + size // 2, y + size // 2, colour) for x, y, size, colour in make.SQUARES]


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("level", [0, 1])
def test_read_region_returns_the_planted_pixels(
    slides: dict[str, Path], name: str, level: int
) -> None:
    with open_slide(slides[name]) as slide:
        for cx, cy, colour in _square_centres():
            patch = slide.read_region(level, cx - 16, cy - 16, 8, 8)
            assert patch.shape == (8, 8, 3)
            assert patch.dtype == np.uint8
            assert np.abs(patch.astype(int) - colour).max() <= TOLERANCE, (name, level, colour)
        # A region straddling the first square's top-left corner: level-0 coordinates
        # address the same place whatever the level.
        x, y, _, colour = make.SQUARES[0]
        ds = 2**level
        region = slide.read_region(level, x - 64, y - 64, 128 // ds, 128 // ds)
        half = 64 // ds
        inside = region[half + 4 :, half + 4 :]
        outside = region[: half - 8, : half - 8]
        assert np.abs(inside.astype(int) - colour).max() <= TOLERANCE
        assert np.abs(outside.astype(int) - 255).max() <= TOLERANCE
        # Outside the slide is white glass, not black.
        beyond = slide.read_region(level, make.WIDTH + 100, 0, 4, 4)
        assert (beyond >= 255 - TOLERANCE).all()


def _exposed_text(slide: SlideReader) -> str:
    parts = [repr(slide), str(slide)]
    for attr in dir(slide):
        if attr.startswith("_"):
            continue
        value = getattr(slide, attr)
        if not callable(value):
            parts.append(f"{attr}={value!r}")
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["svs", "dicom"])
def test_patient_data_never_leaves_the_reader(slides: dict[str, Path], name: str) -> None:
    # The fixtures do carry patient text where a scanner puts it: OpenSlide itself
    # shows it (label, macro, properties) ...
    raw = openslide.OpenSlide(slides[name])
    raw_props = "\n".join(f"{k}={v}" for k, v in raw.properties.items())
    assert make.PATIENT.replace(" ", "^") in raw_props or make.PATIENT in raw_props
    if name == "svs":
        assert {"label", "macro"} <= set(raw.associated_images)
    raw.close()
    # ... the reader does not.
    with open_slide(slides[name]) as slide:
        public = {a for a in dir(slide) if not a.startswith("_")}
        assert not public & {"associated_images", "properties", "label", "macro", "metadata"}
        text = _exposed_text(slide)
        assert make.PATIENT not in text
        assert make.PATIENT.replace(" ", "^") not in text
        assert "PATIENT" not in text


def test_stripped_single_level_tiff_is_refused(tmp_path: Path) -> None:
    path = make.write_stripped_tiff(tmp_path / "plain.tiff")
    with pytest.raises(UnsupportedSlideFormat, match="stripped"):
        sniff_slide(path)
    with pytest.raises(UnsupportedSlideFormat):
        open_slide(path)


def test_single_level_tiled_tiff_is_refused(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "one-level.tiff"
    tifffile.imwrite(path, make.level0(), tile=(256, 256), photometric="rgb")
    with pytest.raises(UnsupportedSlideFormat, match="single-level"):
        open_slide(path)


def test_png_is_refused(tmp_path: Path) -> None:
    path = make.write_png(tmp_path / "slide.svs")
    with pytest.raises(UnsupportedSlideFormat, match="PNG"):
        open_slide(path)


def test_empty_and_unknown_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedSlideFormat, match="empty"):
        open_slide(empty)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"hello, not a slide" * 100)
    with pytest.raises(UnsupportedSlideFormat, match="not a whole-slide format"):
        open_slide(junk)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_svs_is_refused_naming_the_problem(
    slides: dict[str, Path], tmp_path: Path, fraction: float
) -> None:
    cut = make.truncate(slides["svs"], tmp_path / "cut.svs", fraction)
    with pytest.raises(InvalidSlide, match="truncated") as err:
        open_slide(cut)
    assert isinstance(err.value, TruncatedSlide) or "damaged or truncated" in str(err.value)


def test_truncated_header_is_refused(slides: dict[str, Path], tmp_path: Path) -> None:
    cut = make.truncate(slides["svs"], tmp_path / "cut.svs", 0.00001)
    with pytest.raises(InvalidSlide):
        open_slide(cut)


def test_dicom_that_is_not_a_slide_is_refused(slides: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(slides["dicom"].read_bytes())
    at = data.index(b"1.2.840.10008.5.1.4.1.1.77.1.6")
    # CT Image Storage, padded to the same length so the element lengths still hold.
    data[at : at + 30] = b"1.2.840.10008.5.1.4.1.1.2".ljust(30, b"\x00")
    path = tmp_path / "ct.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedSlideFormat, match="not a whole-slide image"):
        open_slide(path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(slides["dicom"].read_bytes()[:150])
    with pytest.raises(TruncatedSlide, match="meta information"):
        sniff_slide(cut)


def test_closed_reader_refuses_reads(slides: dict[str, Path]) -> None:
    slide = open_slide(slides["generic"])
    slide.close()
    slide.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        slide.read_region(0, 0, 0, 4, 4)


def test_region_arguments_are_checked(slides: dict[str, Path]) -> None:
    with open_slide(slides["generic"]) as slide:
        with pytest.raises(ValueError, match="level"):
            slide.read_region(make.LEVELS, 0, 0, 4, 4)
        with pytest.raises(ValueError, match="size"):
            slide.read_region(0, 0, 0, 0, 4)
        with pytest.raises(ValueError, match="size"):
            slide.read_region(0, 0, 0, 100_000, 100_000)
