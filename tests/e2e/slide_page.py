"""What the slide view tests read off the page: tile requests by Deep Zoom level, the
boxes the overlay drew (the page's ``hepatoSlide`` hook), its pixels, and when the view has
settled. Shared by tests/e2e/test_slide_viewer.py."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from tests.slides import planted

TOLERANCE_PX = 4.0
# The overlay's class colours (gateway/static/viewer/common.js).
CLASS_RGB = {"steatosis": (0x00, 0x9E, 0x73), "inflammation": (0xE6, 0x9F, 0x00)}
TILE = re.compile(r"/dzi_files/(\d+)/(\d+)_(\d+)\.jpeg$")
# The Deep Zoom level at level-0 resolution: ceil(log2(max(W, H))).
TOP_LEVEL = (max(planted.WIDTH, planted.HEIGHT) - 1).bit_length()


@contextmanager
def watched(page: Any) -> Iterator[dict[str, list[str]]]:
    """Tile requests (with their key header) and the page's CSP complaints, as they come."""
    seen: dict[str, list[str]] = {"tiles": [], "keys": [], "csp": []}

    def request(r: Any) -> None:
        if TILE.search(urlsplit(r.url).path):
            seen["tiles"].append(r.url)
            seen["keys"].append(r.headers.get("x-api-key", ""))

    def console(m: Any) -> None:
        if "Content Security Policy" in m.text:
            seen["csp"].append(m.text)

    page.on("request", request)
    page.on("console", console)
    yield seen
    assert not seen["csp"], f"the page broke its CSP: {seen['csp']}"


def levels(urls: list[str]) -> Counter[int]:
    found = (TILE.search(urlsplit(u).path) for u in urls)
    return Counter(int(m.group(1)) for m in found if m)


def drawn(page: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("hepatoSlide.drawn()")
    return found


def settle(page: Any, mode: str = "boxes") -> None:
    """Wait until the viewport has stood still, its tiles loaded and the overlay drawn for
    where it stands, for longer than the overlay's debounce; then check the overlay's mode."""
    page.wait_for_function(
        """() => { const now = performance.now();
             if (!hepatoSlide.settled()) { window.settledSince = null; return false; }
             window.settledSince ??= now; return now - window.settledSince > 500; }"""
    )
    assert page.locator("#overlay").get_attribute("data-mode") == mode


def centre(box: dict[str, Any]) -> tuple[float, float]:
    return (box["x1"] + box["x2"]) / 2, (box["y1"] + box["y2"]) / 2


def near(box: dict[str, Any], x: float, y: float) -> bool:
    cx, cy = centre(box)
    return abs(cx - x) <= TOLERANCE_PX and abs(cy - y) <= TOLERANCE_PX


def assert_planted_drawn(boxes: list[dict[str, Any]]) -> None:
    for x, y, label in planted.OBJECTS:
        found = [b for b in boxes if near(b, x, y)]
        assert len(found) == 1, f"object at ({x}, {y}) drawn {len(found)} times"
        assert found[0]["label"] == label
    assert len(boxes) == len(planted.OBJECTS)


def screen_has(
    shot: Image.Image, osd: dict[str, float], x: float, y: float, want: tuple[int, int, int]
) -> bool:
    """Whether the screenshot shows ``want`` (JPEG and blending allowed for) within 2 px
    across of (x, y) in the viewer."""
    for dx in range(-2, 3):
        rgb = shot.getpixel((round(osd["x"] + x) + dx, round(osd["y"] + y)))
        assert isinstance(rgb, tuple)
        if close(rgb, want, 24):
            return True
    return False


def close(rgb: tuple[int, ...], want: tuple[int, int, int], tol: int) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb[:3], want, strict=True))


def edge_has_colour(page: Any, box: dict[str, Any], want: tuple[int, int, int]) -> bool:
    """Whether the overlay canvas holds the class colour on the box's left edge."""
    pixels = page.evaluate(
        """([x, y]) => { const c = document.querySelector('#overlay');
             const d = devicePixelRatio; const out = [];
             for (let dx = -2; dx <= 2; dx++) out.push([...c.getContext('2d')
               .getImageData(Math.round((x + dx) * d), Math.round(y * d), 1, 1).data]);
             return out; }""",
        [box["screen"]["x"], box["screen"]["y"] + box["screen"]["h"] / 2],
    )
    return any(close(tuple(p), want, 8) and p[3] == 255 for p in pixels)


# Whether the overlay canvas shows the mask's outline colour within 10 px across of a
# level-0 point (the mask's pixels are 16 level-0 px).
OUTLINE_NEAR = """([x, y]) => { const item = hepatoSlide.viewer.world.getItemAt(0);
    const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const d = devicePixelRatio; const ctx = document.querySelector('#overlay').getContext('2d');
    const row = ctx.getImageData(Math.round((p.x - 10) * d), Math.round(p.y * d), 20 * d, 1).data;
    for (let i = 0; i < row.length; i += 4)
      if (row[i] < 20 && Math.abs(row[i + 1] - 114) < 20 && Math.abs(row[i + 2] - 178) < 20
          && row[i + 3] > 200) return true;
    return false; }"""
