"""Deep-zoom tiles of a stored slide through the gateway: the descriptor, tiles at the
deepest and at a low level showing the planted objects where they were drawn, ETag and
304, the gateway's tile LRU, out-of-range tiles, and the store's failures."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from hepato.common.db import get_engine
from hepato.common.exceptions import ObjectFetchError
from hepato.common.settings import Settings
from hepato.common.slides import deepzoom
from hepato.common.slides.reader import SlideReader
from hepato.common.storage import ObjectStore
from hepato.common.tables import Slide
from tests.e2e.test_slides import submit
from tests.slides import planted

NS = "{http://schemas.microsoft.com/deepzoom/2008}"
# JPEG at quality 80 over the planted colours (flat squares, noisy tissue).
COLOUR_TOLERANCE = 30
TOP = deepzoom.level_count(planted.WIDTH, planted.HEIGHT) - 1  # 12


def tile(client: TestClient, slide_id: str, level: int, col: int, row: int) -> np.ndarray:
    r = client.get(f"/v1/slides/{slide_id}/dzi_files/{level}/{col}_{row}.jpeg")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"), np.int16)


def object_key(settings: Settings, slide_id: str) -> str:
    with get_engine(settings.database_url).connect() as conn:
        key = conn.execute(select(Slide.object_key).where(Slide.id == slide_id)).scalar_one()
    return str(key)


@pytest.fixture
def region_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every read_region of any slide reader of this process (the gateway's included)."""
    reads: list[tuple[int, ...]] = []
    read_region = SlideReader.read_region

    def counting(self: SlideReader, *args: int) -> np.ndarray:
        reads.append(args)
        return read_region(self, *args)

    monkeypatch.setattr(SlideReader, "read_region", counting)
    return reads


def test_a_slide_is_served_as_deep_zoom(
    slide_client: TestClient, region_reads: list[tuple[int, ...]], tmp_path: Path
) -> None:
    # Not planned yet: the size comes from the slide itself.
    slide_id = submit(slide_client, planted.write_svs(tmp_path / "biopsy.svs"))
    r = slide_client.get(f"/v1/slides/{slide_id}/dzi")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/xml")
    assert r.headers["cache-control"] == "private, max-age=86400"
    image = ET.fromstring(r.text)
    assert image.tag == f"{NS}Image"
    assert image.attrib == {"TileSize": "254", "Overlap": "1", "Format": "jpeg"}
    size = image.find(f"{NS}Size")
    assert size is not None
    assert size.attrib == {"Width": str(planted.WIDTH), "Height": str(planted.HEIGHT)}

    # The deepest level is level 0 of the slide: every planted object where it was drawn.
    for x, y, label in planted.OBJECTS:
        col, row = min(x // 254, 9), min(y // 254, 6)
        tx, ty, tw, th = deepzoom.tile_rect(planted.WIDTH, planted.HEIGHT, TOP, col, row)
        pixels = tile(slide_client, slide_id, TOP, col, row)
        assert pixels.shape == (th, tw, 3)
        got = pixels[y - ty, x - tx]
        assert np.abs(got - planted.COLOURS[label]).max() < COLOUR_TOLERANCE, (x, y, label, got)
    corner = tile(slide_client, slide_id, TOP, 0, 0)
    assert corner.shape == (255, 255, 3)  # 254 and the overlap on the right and bottom
    last = tile(slide_client, slide_id, TOP, 9, 6)
    assert last.shape == (1536 - 6 * 254 + 1, 2304 - 9 * 254 + 1, 3)

    # A low level (1/16): one tile of the whole slide, the picture shrunk; tissue on the
    # left, glass on the right.
    low = TOP - 4
    assert deepzoom.level_tiles(planted.WIDTH, planted.HEIGHT, low) == (1, 1)
    pixels = tile(slide_client, slide_id, low, 0, 0)
    assert pixels.shape == (96, 144, 3)
    expected = cv2.resize(planted.picture(), (144, 96), interpolation=cv2.INTER_AREA)
    assert float(np.abs(pixels - expected.astype(np.int16)).mean()) < 8
    glass = pixels[:, planted.TISSUE_RIGHT // 16 + 2 :]
    assert glass.min() > 240
    assert np.abs(pixels[:, :80].mean(axis=(0, 1)) - (235, 170, 210)).max() < 15
    whole = tile(slide_client, slide_id, 0, 0, 0)
    assert whole.shape == (1, 1, 3)

    # A second request for a tile is served from the gateway's LRU: no read.
    url = f"/v1/slides/{slide_id}/dzi_files/{TOP}/5_5.jpeg"
    before = len(region_reads)
    first = slide_client.get(url)
    reads = len(region_reads)
    assert reads == before + 1
    second = slide_client.get(url)
    assert len(region_reads) == reads
    assert second.content == first.content
    etag = first.headers["etag"]
    assert etag.startswith('"') and second.headers["etag"] == etag
    assert first.headers["cache-control"] == "private, max-age=86400"

    # ETag: one per tile, and If-None-Match answers 304 with no body and no read.
    other = slide_client.get(f"/v1/slides/{slide_id}/dzi_files/{TOP}/5_4.jpeg")
    assert other.headers["etag"] != etag
    reads = len(region_reads)
    for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = slide_client.get(url, headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b"" and r.headers["etag"] == etag
    assert slide_client.get(url, headers={"If-None-Match": '"nope"'}).status_code == 200
    dzi_etag = slide_client.get(f"/v1/slides/{slide_id}/dzi").headers["etag"]
    r = slide_client.get(f"/v1/slides/{slide_id}/dzi", headers={"If-None-Match": dzi_etag})
    assert r.status_code == 304
    assert len(region_reads) == reads

    # Out of range: 404 naming what is out.
    for path, named in (
        (f"{TOP + 1}/0_0", f"level {TOP + 1} out of range"),
        ("-1/0_0", "level -1 out of range"),
        (f"{TOP}/10_0", "tile column 10 out of range"),
        (f"{TOP}/0_7", "tile row 7 out of range"),
        (f"{low}/1_0", "tile column 1 out of range"),
    ):
        r = slide_client.get(f"/v1/slides/{slide_id}/dzi_files/{path}.jpeg")
        assert r.status_code == 404, path
        assert named in r.json()["detail"]
    assert slide_client.get(f"/v1/slides/{slide_id}/dzi_files/1/a_b.jpeg").status_code in (
        404,
        422,
    )


def test_a_slide_gone_is_404_and_a_store_down_is_503(
    slide_client: TestClient,
    slide_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = planted.write_tiff(tmp_path / "biopsy.tiff")
    gone, down = submit(slide_client, path), submit(slide_client, path)
    ObjectStore(slide_settings).remove([object_key(slide_settings, gone)])
    for url in (f"/v1/slides/{gone}/dzi", f"/v1/slides/{gone}/dzi_files/{TOP}/0_0.jpeg"):
        r = slide_client.get(url)
        assert r.status_code == 404
        assert r.json()["detail"] == f"the file of slide {gone} is gone from the object store"

    def unreachable(self: ObjectStore, key: str, path: Path, chunk_bytes: int = 0) -> int:
        raise ObjectFetchError(f"object {key!r}: object store unreachable")

    monkeypatch.setattr(ObjectStore, "download_to", unreachable)
    r = slide_client.get(f"/v1/slides/{down}/dzi_files/{TOP}/0_0.jpeg")
    assert r.status_code == 503 and r.headers["retry-after"]
    monkeypatch.undo()
    assert slide_client.get(f"/v1/slides/{down}/dzi_files/{TOP}/0_0.jpeg").status_code == 200


def test_a_slide_to_deidentify_is_viewed_only_once_deidentified(
    slide_client: TestClient,
    run_slide_workers: Callable[..., None],
    slide_settings: Settings,
    tmp_path: Path,
) -> None:
    path = planted.write_svs(tmp_path / "biopsy.svs")
    slide_id = submit(slide_client, path, deidentify="true")
    original = object_key(slide_settings, slide_id)
    for url in (f"/v1/slides/{slide_id}/dzi", f"/v1/slides/{slide_id}/dzi_files/{TOP}/0_0.jpeg"):
        r = slide_client.get(url)
        assert r.status_code == 409 and "deidentify" in r.json()["detail"]
    run_slide_workers(1)
    assert object_key(slide_settings, slide_id) != original
    r = slide_client.get(f"/v1/slides/{slide_id}/dzi")
    assert r.status_code == 200 and 'Width="2304"' in r.text
    x, y, label = planted.OBJECTS[0]
    pixels = tile(slide_client, slide_id, TOP, 0, 0)
    assert np.abs(pixels[y, x] - planted.COLOURS[label]).max() < COLOUR_TOLERANCE
