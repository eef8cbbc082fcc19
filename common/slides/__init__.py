"""Whole-slide images: sniffing the format from the bytes and reading pyramid regions
behind one small interface that never exposes label, macro or scanner metadata."""

from hepato.common.slides.reader import SlideReader, open_slide
from hepato.common.slides.sniff import SlideFormat, Sniffed, sniff_slide

__all__ = ["SlideFormat", "SlideReader", "Sniffed", "open_slide", "sniff_slide"]
