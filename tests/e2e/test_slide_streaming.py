"""A slide upload is streamed: spooled to disk by the parser, sniffed there, sent to the
store a part at a time. The gateway's memory does not grow with the slide's size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import numpy as np
import tifffile
from sqlalchemy import select

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Slide
from hepato.gateway.app import create_app
from tests.e2e.test_streaming import HELD
from tests.security.files import MiB, measured
from tests.server import serve


def pyramid_tiff(path: Path, side: int) -> Path:
    """A tiled two-level TIFF of random pixels, uncompressed: its size is its pixels."""
    rng = np.random.default_rng(3)
    with tifffile.TiffWriter(path) as tif:
        for level, s in enumerate((side, side // 2)):
            pixels = rng.integers(0, 255, (s, s, 3), dtype=np.uint8)
            tif.write(pixels, tile=(256, 256), photometric="rgb", subfiletype=1 if level else 0)
    return path


def test_a_60_mb_slide_is_not_held_in_memory(settings: Settings, tmp_path: Path) -> None:
    big = pyramid_tiff(tmp_path / "big.tiff", 4096)
    small = pyramid_tiff(tmp_path / "small.tiff", 2048)
    size, small_size = big.stat().st_size, small.stat().st_size
    assert size > 60_000_000
    costs = {}
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as http:
        for path in (small, small, big):  # the first: first-request costs
            with path.open("rb") as file, measured() as cost:
                r = http.post("/v1/slides", files={"file": (path.name, file, "image/tiff")})
            assert r.status_code == 202, r.text
            costs[path.name] = cost
    cost = costs["big.tiff"]
    per_byte = (cost.rss_growth - costs["small.tiff"].rss_growth) / (size - small_size)
    print(f"{size / MiB:.0f} MiB slide: {cost}; per byte beyond the baseline {per_byte:.3f}")
    assert cost.traced_peak < HELD, f"Python allocations peaked at {cost.traced_peak / MiB} MiB"
    assert per_byte < 0.25, f"resident memory grows {per_byte:.2f} bytes per uploaded byte"
    with get_engine(settings.database_url).connect() as conn:
        key = conn.execute(select(Slide.object_key).where(Slide.size_bytes == size)).scalar_one()
    stored = ObjectStore(settings).get(key)
    assert hashlib.sha256(stored).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_a_slide_past_its_own_limit_is_413_naming_the_setting(
    settings: Settings, tmp_path: Path
) -> None:
    small = pyramid_tiff(tmp_path / "small.tiff", 1024)
    limited = settings.model_copy(update={"max_slide_bytes": small.stat().st_size - 1})
    with (
        serve(create_app(limited)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
        small.open("rb") as file,
    ):
        r = http.post("/v1/slides", files={"file": (small.name, file, "image/tiff")})
    assert r.status_code == 413 and "HEPATO_MAX_SLIDE_BYTES" in r.json()["detail"]
