"""Which pyramid level a read takes: real pyramids round their level sizes to whole
pixels, so a level's downsample is a little off its factor and must still be chosen."""

from __future__ import annotations

from types import SimpleNamespace

from hepato.common.slides.reader import SlideReader
from hepato.common.slides.sniff import SlideFormat


def reader(downsamples: tuple[float, ...]) -> SlideReader:
    slide = SimpleNamespace(
        level_dimensions=[(round(28285 / d), round(28285 / d)) for d in downsamples],
        level_downsamples=downsamples,
        properties={},
    )
    return SlideReader(slide, SlideFormat.GENERIC_TIFF, (0.5, 0.5))


def test_a_level_a_rounding_off_its_factor_is_still_taken() -> None:
    r = reader((1.0, 4.0001, 16.007, 64.03))
    assert r.best_level_for_downsample(16.0) == 2
    assert r.best_level_for_downsample(4.0) == 1
    assert r.best_level_for_downsample(64.0) == 3


def test_never_a_level_coarser_than_asked() -> None:
    r = reader((1.0, 4.0, 16.0))
    assert r.best_level_for_downsample(15.0) == 1
    assert r.best_level_for_downsample(1.0) == 0
    assert r.best_level_for_downsample(0.5) == 0
