"""The slide report (``GET /v1/slides/{id}/report``) on the real services, on the planted
slide of tests/slides/planted.py: its figures are GET /v1/slides/{id}'s, its heat map is
hot over the tiles that hold a planted object and untouched elsewhere, it loads nothing,
names no patient, and a slide that is not finished still gets one saying so."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.slide_schemas import SlideOut, TileCounts
from hepato.gateway.slide_report_render import TileCount, density_grid, render_report
from tests.e2e.test_slides import submit
from tests.slides import planted

NOTICE = "Research use only — not for diagnosis"
VOID = {"img", "meta", "br", "hr", "link", "input", "source"}
CHROMIUM = Path("/usr/bin/chromium")
X = "\u00d7"  # the multiplication sign the page writes sizes with


class Page(HTMLParser):
    """Every element of the page as (tag, attributes, text inside it)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], str]] = []
        self._open: list[tuple[str, dict[str, str], list[str]]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        # A cell knows its row's class, for finding a figure by class and field.
        rows = [a for name, a, _ in self._open if name == "tr"]
        if tag == "td" and rows:
            found["row-class"] = rows[-1].get("data-class", "")
        if tag in VOID:
            self.elements.append((tag, found, ""))
        else:
            self._open.append((tag, found, []))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            name, attrs, parts = self._open.pop()
            self.elements.append((name, attrs, "".join(parts)))
            if name == tag:
                return

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, _, parts in self._open:
            parts.append(data)

    def all(self, tag: str | None = None, **attrs: str) -> list[tuple[dict[str, str], str]]:
        return [
            (a, t)
            for name, a, t in self.elements
            if (tag is None or name == tag) and all(a.get(k) == v for k, v in attrs.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> tuple[dict[str, str], str]:
        found = self.all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, found)
        return found[0]


def report(client: TestClient, slide_id: str) -> str:
    r = client.get(f"/v1/slides/{slide_id}/report")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    return r.text


def assert_self_contained(html: str, page: Page) -> None:
    """Nothing is fetched: no script, link or frame; every src a data: URI; no url()."""
    for tag, attrs, _ in page.elements:
        assert tag not in {"script", "link", "iframe", "object", "embed", "base"}, tag
        assert "href" not in attrs, attrs
        assert attrs.get("src", "data:").startswith("data:"), attrs
        assert not any(k.startswith("on") for k in attrs), attrs
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", html)
    assert not re.search(r"url\(|@import|https?:|//[a-z]", outside_images)
    style = page.one("style")[1]
    assert re.search(r"@page\s*{\s*size:\s*A4 portrait", style)


def decoded(page: Page) -> Image.Image:
    src = page.one("img", id="overlay")[0]["src"]
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :]))).convert("RGB")


def heat_at(diff: np.ndarray, x: float, y: float, scale: float, radius: float) -> float:
    """The largest change the heat map made within ``radius`` level-0 px of (x, y)."""
    r = max(1, round(radius * scale))
    cx, cy = round(x * scale), round(y * scale)
    window = diff[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1]
    return float(window.max())


def empty_tissue_points(margin: int = 300) -> list[tuple[int, int]]:
    """Points of tissue further than ``margin`` level-0 px (more than a core and a half)
    from every planted object, in x or in y: in cores with no detection."""
    return [
        (x, y)
        for x in range(60, planted.TISSUE_RIGHT - 60, 40)
        for y in range(60, planted.HEIGHT - 60, 40)
        if all(max(abs(x - ox), abs(y - oy)) > margin for ox, oy, _ in planted.OBJECTS)
    ]


def test_the_report_shows_the_slide_and_its_figures(
    slide_client: TestClient, run_slide_workers: Callable[..., None], tmp_path: Path
) -> None:
    # An SVS with the patient in its label, macro and description, not de-identified.
    path = planted.write_svs(tmp_path / "biopsy.svs", patient="Jane Doe")
    assert b"Jane Doe" in path.read_bytes()
    slide_id = submit(slide_client, path)
    run_slide_workers(1)
    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert slide["state"] == "done", slide
    html = report(slide_client, slide_id)
    page = Page(html)
    words = " ".join("".join(page.text).split())

    assert "Jane Doe" not in html
    assert_self_contained(html, page)
    assert page.one(None, **{"class": "notice"})[1] == NOTICE
    assert not page.all(None, **{"class": "state"}), "a done slide has no state warning"
    assert page.one(None, **{"data-field": "state"})[1] == "done"
    for shown in (
        slide_id,
        "biopsy.svs",
        "aperio-svs",
        f"{planted.WIDTH:,} {X} {planted.HEIGHT:,} px",
        f"{planted.MPP:.4f} {X} {planted.MPP:.4f} µm/px (slide metadata)",
        f"20{X}",
        f"{slide['model']}, version {slide['model_version']}",
        f"{slide['tile_size']} px, overlap {slide['tile_overlap']} px",
    ):
        assert shown in words, shown
    tiles = slide["tiles"]
    assert page.one("td", **{"data-tiles": "tiles"})[1].startswith(
        f"{tiles['total']}: done {tiles['done']}, pending 0"
    )

    # The summary, figure for figure, as GET /v1/slides/{id} answers it.
    summary = slide["summary"]
    area, shown_area = page.one("td", **{"data-field": "tissue_area_mm2"})
    assert float(area["data-value"]) == summary["tissue_area_mm2"]
    assert shown_area == f"{summary['tissue_area_mm2']:,.3f} mm²"
    band = page.one("td", **{"data-field": "steatosis_band"})[1]
    assert band.startswith(summary["steatosis_band"] + " ")
    assert {a["data-class"] for a, _ in page.all("tr") if "data-class" in a} == {
        c["label"] for c in summary["classes"]
    }
    for c in summary["classes"]:
        cells = {
            a["data-field"]: (a["data-value"], t)
            for a, t in page.all("td", **{"row-class": c["label"]})
            if "data-field" in a
        }
        assert cells["count"] == (str(c["count"]), f"{c['count']:,}")
        assert float(cells["per_mm2"][0]) == c["per_mm2"]
        assert cells["per_mm2"][1] == f"{c['per_mm2']:,.2f}"
        assert float(cells["area_fraction"][0]) == c["area_fraction"]
        assert cells["area_fraction"][1] == f"{100 * c['area_fraction']:.2f}%"

    # The heat map: the thumbnail, changed over the cores of tiles with an object only.
    overlay = decoded(page)
    thumb = Image.open(io.BytesIO(slide_client.get(f"/v1/slides/{slide_id}/thumbnail").content))
    assert overlay.size == thumb.size
    diff = np.abs(np.asarray(overlay, np.int16) - np.asarray(thumb.convert("RGB"), np.int16))
    diff = diff.mean(axis=2)
    scale = overlay.width / planted.WIDTH
    hot = [heat_at(diff, x, y, scale, planted.OBJECT) for x, y, _ in planted.OBJECTS]
    cold = [heat_at(diff, x, y, scale, 20) for x, y in empty_tissue_points()]
    assert len(cold) > 20
    assert min(hot) > 20, hot
    assert max(cold) == 0, "the heat map coloured tissue of a tile without detections"
    assert diff[:, round(planted.TISSUE_RIGHT * scale) + 2 :].max() == 0, "glass coloured"
    assert "detections per mm²" in words and "or more" in words


def test_an_unfinished_slide_still_gets_a_report(
    slide_client: TestClient,
    run_slide_workers: Callable[..., None],
    slide_settings: Settings,
    tmp_path: Path,
) -> None:
    path = planted.write_tiff(tmp_path / "biopsy.tiff")
    with path.open("rb") as f:
        r = slide_client.post(
            "/v1/slides", files={"file": ("<img src=x onerror=alert(1)>.tiff", f)}
        )
    assert r.status_code == 202, r.text
    slide_id = r.json()["slide_id"]

    # Not planned yet: no thumbnail, no tiles, no summary; the page says so and renders.
    html = report(slide_client, slide_id)
    page = Page(html)
    assert_self_contained(html, page)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.tiff" in html
    note = page.one("div", **{"data-state": "pending"})[1]
    assert "not planned yet" in note and "0 tiles" in note
    assert not page.all("img") and "No summary yet" in html

    # Mid-slide: done, then three tiles that found something put back to pending, as the
    # slide stood before they ran.
    run_slide_workers(1)
    with get_engine(slide_settings.database_url).begin() as conn:
        back = conn.execute(
            text(
                "UPDATE jobs SET state = 'pending', result = NULL, tile_stats = NULL, "
                "finished_at = NULL WHERE id IN (SELECT j.id FROM jobs j "
                "CROSS JOIN LATERAL jsonb_each(j.tile_stats->'classes') c(k, v) "
                "WHERE j.batch_id = :s AND j.kind = 'tile' GROUP BY j.id "
                "HAVING sum((c.v->>'count')::int) > 0 ORDER BY j.id LIMIT 3)"
            ),
            {"s": slide_id},
        ).rowcount
        conn.execute(
            text(
                "UPDATE slides SET state = 'processing', summary = NULL, finished_at = NULL, "
                "model_version = NULL WHERE id = :s"
            ),
            {"s": slide_id},
        )
    assert back == 3
    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    tiles = slide["tiles"]
    assert slide["state"] == "processing" and tiles["pending"] == 3
    html = report(slide_client, slide_id)
    page = Page(html)
    assert_self_contained(html, page)
    note = page.one("div", **{"data-state": "processing"})[1]
    assert f"{tiles['done']} of {tiles['total']} tiles done" in note
    assert page.one(None, **{"data-field": "state"})[1] == "processing"
    assert "No summary yet" in html and "Summary (not finished)" in html
    # The version comes from a done tile while the slide's own is not set yet.
    assert f"{slide['model']}, version {planted.manifest().version}" in html
    overlay = decoded(page)
    assert (
        overlay.size
        == Image.open(io.BytesIO(slide_client.get(f"/v1/slides/{slide_id}/thumbnail").content)).size
    )


@pytest.mark.slow
def test_the_report_prints_on_one_a4_page(
    slide_client: TestClient, run_slide_workers: Callable[..., None], tmp_path: Path
) -> None:
    # ./dev test installs Debian's Chromium: missing, this fails rather than skips.
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing (./dev test installs it)"
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    run_slide_workers(1)
    page = tmp_path / "report.html"
    page.write_text(report(slide_client, slide_id), encoding="utf-8")
    pdf = tmp_path / "report.pdf"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-pdf-header-footer",
            f"--print-to-pdf={pdf}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = pdf.read_bytes()
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) == 1, "the report is not one page"
    # A4 portrait is 595 x 842 pt.
    box = re.search(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", data)
    assert box and (round(float(box[1])), round(float(box[2]))) == (595, 842)


# --- the renderer alone (no services) ------------------------------------------------


def test_cores_are_painted_without_overlap_and_escaped_in_the_page() -> None:
    # Two neighbouring cores of 192 level-0 px on a 384 x 192 slide, 10 thumbnail px.
    tiles = [TileCount(0, 0, 192, 192, 2), TileCount(192, 0, 384, 192, 1)]
    grid = density_grid(tiles, (384, 192), (10, 5))
    assert grid.shape == (5, 10)
    assert (grid[:, :5] == 2 / 192**2).all() and (grid[:, 5:] == 1 / 192**2).all()
    # A core under one thumbnail pixel still gets one.
    tiny = density_grid([TileCount(100, 100, 101, 101, 1)], (10_000, 10_000), (10, 10))
    assert np.count_nonzero(tiny) == 1

    hostile = '"><script>alert(1)</script>'
    slide = SlideOut(
        id="00000000-0000-0000-0000-000000000001",
        state="failed",
        filename=hostile,
        format="generic-tiff",
        size_bytes=1,
        model=hostile,
        tiles=TileCounts(),
        error=hostile,
        created_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    html = render_report(slide, None, model_version=hostile, generated_at=datetime.now(UTC))
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "This slide failed" in html and NOTICE in html
