"""The one-page report of a whole slide: its thumbnail with a heat map of the detections
drawn over it (Pillow), and the page itself (HTML that prints on one A4 sheet).

Pure functions of what the route read: the slide as GET /v1/slides/{id} answers it, each
done tile's core and detection count, and the thumbnail PNG the planning worker rendered
from the pyramid. Nothing else reaches the page, so it holds no label, macro or scanner
metadata; every value is HTML-escaped, the client's filename included. The page loads
nothing: its style is inline and the image a data: URI."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from string import Template

import numpy as np
from PIL import Image

from hepato.common.slide_schemas import SLIDE_TERMINAL_STATES, SlideOut, SlideState
from hepato.gateway.export_formats import class_color

# The heat ramp, low to high (RGB), and its opacity at the low and high end: a tile with
# no detection is not drawn at all, so the tissue under it shows as scanned.
HEAT_LOW = (255, 214, 0)
HEAT_HIGH = (214, 0, 0)
ALPHA_LOW, ALPHA_HIGH = 0.35, 0.65
# The colour scale tops out at this percentile of the tiles' densities, so one crowded
# tile does not wash out the rest; tiles above it are drawn at the top colour.
SCALE_PERCENTILE = 99.0
NOT_STATED = "not stated"
TIMES = "\u00d7"  # the multiplication sign of "2,304 x 1,536 px"
# The page's banner; the summary's own notice (common.slide_schemas) says the same.
NOTICE = "Research use only — not for diagnosis"


@dataclass(frozen=True)
class TileCount:
    """A done tile's core (level-0 px, x1 and y1 exclusive) and its detections there."""

    x0: int
    y0: int
    x1: int
    y1: int
    count: int


@dataclass(frozen=True)
class Overlay:
    """The thumbnail with the heat map over it, and what its legend says."""

    png: bytes
    width: int
    height: int
    # The density drawn at the top colour; None when no tile has a detection.
    scale_top: float | None
    unit: str


def density_grid(
    tiles: Sequence[TileCount], level0: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Detections per level-0 px² of each tile's core, painted on a (height, width) grid
    of ``size`` = (width, height) thumbnail pixels covering the ``level0`` (width,
    height) slide. Cores partition the slide; both edges of a core are rounded the same
    way, so neighbours do not overlap, and a core under one pixel still gets one (where
    several share a pixel, the densest shows)."""
    width, height = size
    grid = np.zeros((height, width), np.float64)
    rects = np.array([(t.x0, t.y0, t.x1, t.y1, t.count) for t in tiles], np.float64)
    if not len(rects):
        return grid
    x0, y0, x1, y1, count = rects.T
    area = (x1 - x0) * (y1 - y0)
    keep = (count > 0) & (area > 0)
    x0, y0, x1, y1, density = x0[keep], y0[keep], x1[keep], y1[keep], count[keep] / area[keep]
    sx, sy = width / level0[0], height / level0[1]
    px0 = np.clip(np.rint(x0 * sx), 0, width - 1).astype(np.int64)
    py0 = np.clip(np.rint(y0 * sy), 0, height - 1).astype(np.int64)
    px1 = np.clip(np.maximum(px0 + 1, np.rint(x1 * sx)), 0, width).astype(np.int64)
    py1 = np.clip(np.maximum(py0 + 1, np.rint(y1 * sy)), 0, height).astype(np.int64)
    # Sparsest first: where rectangles meet on one pixel, the densest is painted last.
    order = np.argsort(density, kind="stable")
    for a, b, c, d, v in zip(
        py0[order].tolist(),
        py1[order].tolist(),
        px0[order].tolist(),
        px1[order].tolist(),
        density[order].tolist(),
        strict=True,
    ):
        grid[a:b, c:d] = v
    return grid


def heat_rgba(grid: np.ndarray, top: float) -> np.ndarray:
    """The RGBA layer of a density grid: transparent where it is 0, else the ramp from
    HEAT_LOW to HEAT_HIGH with ``top`` (and above) at the high end."""
    t = np.clip(grid / top, 0.0, 1.0)[..., None] if top > 0 else np.zeros((*grid.shape, 1))
    low, high = np.array(HEAT_LOW, np.float64), np.array(HEAT_HIGH, np.float64)
    rgb = low + (high - low) * t
    alpha = np.where(grid[..., None] > 0, ALPHA_LOW + (ALPHA_HIGH - ALPHA_LOW) * t, 0.0)
    layer = np.concatenate([rgb, alpha * 255.0], axis=2)
    return np.round(layer).astype(np.uint8)


def render_overlay(
    thumbnail_png: bytes,
    tiles: Sequence[TileCount],
    level0: tuple[int, int],
    mpp: tuple[float, float] | None,
) -> Overlay:
    """The thumbnail with each done tile's core coloured by its detections per mm² (all
    classes), scaled from level-0 to thumbnail pixels."""
    base = Image.open(io.BytesIO(thumbnail_png)).convert("RGBA")
    grid = density_grid(tiles, level0, base.size)
    # Per mm² when the slide's pixel size is known (it is, once planned), else per Mpx.
    per_px_to_unit = 1e6 / (mpp[0] * mpp[1]) if mpp else 1e6
    unit = "detections per mm²" if mpp else "detections per level-0 megapixel"
    densities = [t.count / ((t.x1 - t.x0) * (t.y1 - t.y0)) for t in tiles if _drawn(t)]
    top = float(np.percentile(densities, SCALE_PERCENTILE)) if densities else 0.0
    if top > 0:
        layer = Image.fromarray(heat_rgba(grid, top), "RGBA")
        base = Image.alpha_composite(base, layer)
    buffer = io.BytesIO()
    base.convert("RGB").save(buffer, format="PNG")
    return Overlay(
        png=buffer.getvalue(),
        width=base.width,
        height=base.height,
        scale_top=top * per_px_to_unit if top > 0 else None,
        unit=unit,
    )


def _drawn(t: TileCount) -> bool:
    return t.count > 0 and t.x1 > t.x0 and t.y1 > t.y0


# --- the page ----------------------------------------------------------------------

STYLE = """
@page { size: A4 portrait; margin: 12mm; }
* { box-sizing: border-box; }
body { font: 9pt/1.3 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  color: #1a1a1a; margin: 0 auto; max-width: 186mm; padding: 6mm 0; }
h1 { font-size: 14pt; margin: 0 0 1mm; }
h2 { font-size: 10.5pt; margin: 3mm 0 1.5mm; border-bottom: 1px solid #bbb; }
.sub { color: #555; margin: 0 0 2mm; word-break: break-all; }
.notice { border: 2px solid #b00020; color: #b00020; font-weight: 700; padding: 1.5mm 3mm;
  margin: 2mm 0; text-align: center; }
.state { border: 1px solid #c77700; background: #fff4e0; padding: 1.5mm 3mm; margin: 2mm 0; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 0.5mm 1.5mm; border-bottom: 1px solid #e3e3e3; text-align: left;
  vertical-align: top; }
th { font-weight: 600; width: 30%; color: #333; }
table.figures th, table.figures td { width: auto; }
table.figures td:first-child { white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 3mm; height: 3mm; margin-right: 1.5mm;
  border: 1px solid #0004; vertical-align: -0.3mm; }
.cols { display: flex; gap: 5mm; align-items: flex-start; }
.cols > div { flex: 1 1 0; min-width: 0; }
figure { margin: 0; text-align: center; break-inside: avoid; }
figure img { max-width: 100%; max-height: 95mm; width: auto; height: auto; border: 1px solid #ccc; }
figcaption { color: #555; font-size: 8.5pt; margin-top: 1mm; }
.legend { display: flex; align-items: center; gap: 2mm; justify-content: center;
  font-size: 8.5pt; margin-top: 1mm; }
.ramp { width: 40mm; height: 3mm; border: 1px solid #999; }
.missing { color: #555; border: 1px dashed #bbb; padding: 8mm; }
footer { margin-top: 4mm; color: #555; font-size: 8pt; }
@media print { body { padding: 0; } }
"""

PAGE = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$style</style>
</head>
<body>
$body
</body>
</html>
"""
)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _row(label: str, value: str, attr: str = "") -> str:
    return f"<tr><th>{_e(label)}</th><td{attr}>{_e(value)}</td></tr>"


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if at else "not yet"


def fmt_count(n: int) -> str:
    return f"{n:,}"


def fmt_per_mm2(v: float) -> str:
    return f"{v:,.2f}"


def fmt_fraction(v: float) -> str:
    return f"{100 * v:.2f}%"


def fmt_area_mm2(v: float) -> str:
    return f"{v:,.3f}"


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})"


def _metadata(slide: SlideOut, model_version: str | None) -> str:
    t = slide.tiles
    rows = [
        _row("Slide id", str(slide.id)),
        _row("File name", slide.filename),
        _row("Format", slide.format),
        _row("File size", f"{slide.size_bytes / 1e6:,.1f} MB"),
    ]
    if slide.width and slide.height:
        size = f"{slide.width:,} {TIMES} {slide.height:,} px"
        if slide.mpp:
            size += f" ({slide.width * slide.mpp[0] / 1e3:.2f} {TIMES} "
            size += f"{slide.height * slide.mpp[1] / 1e3:.2f} mm)"
        rows.append(_row("Level-0 size", size))
    else:
        rows.append(_row("Level-0 size", "not read yet (the slide is not planned)"))
    if slide.mpp:
        source = {"slide": "slide metadata", "submitted": "given at submission"}
        mpp = f"{slide.mpp[0]:.4f} {TIMES} {slide.mpp[1]:.4f} µm/px"
        rows.append(_row("MPP", f"{mpp} ({source.get(slide.mpp_source or '', NOT_STATED)})"))
    else:
        rows.append(_row("MPP", NOT_STATED))
    power = f"{slide.objective_power:g}{TIMES}" if slide.objective_power else NOT_STATED
    rows.append(_row("Objective", power))
    rows.append(_row("Levels", str(slide.levels) if slide.levels else NOT_STATED))
    if slide.tile_size is not None:
        tile = f"{slide.tile_size} px, overlap {slide.tile_overlap or 0} px (model px)"
        rows.append(_row("Tile", tile))
    by_state = ", ".join(
        f"{name} {fmt_count(getattr(t, name))}"
        for name in ("done", "pending", "processing", "failed", "canceled", "expired")
    )
    rows.append(_row("Tiles", f"{fmt_count(t.total)}: {by_state}", ' data-tiles="tiles"'))
    rows.append(_row("De-identified", "yes" if slide.deidentified else "no"))
    rows.append(_row("Model", f"{slide.model}, version {model_version or 'not known yet'}"))
    rows.append(_row("Submitted", _when(slide.created_at)))
    rows.append(_row("Planned", _when(slide.planned_at)))
    rows.append(_row("Finished", _when(slide.finished_at)))
    return "<table class='meta'>" + "".join(rows) + "</table>"


def _state_note(slide: SlideOut) -> str:
    t = slide.tiles
    state = slide.state
    if state is SlideState.done:
        return ""
    if state is SlideState.done_with_failures:
        text = (
            f"Finished with failures: {fmt_count(t.failed + t.expired)} of "
            f"{fmt_count(t.total)} tiles failed or expired; their areas have no detections."
        )
    elif state is SlideState.failed:
        text = f"This slide failed and has no results: {slide.error or 'no reason recorded'}"
    elif state is SlideState.canceled:
        text = (
            f"This slide was canceled: {fmt_count(t.done)} of {fmt_count(t.total)} tiles "
            "were done; the figures cover those tiles only."
        )
    elif t.total == 0:
        text = f"Not finished: this slide is {state.value} and not planned yet (0 tiles)."
    else:
        text = (
            f"Not finished: this slide is {state.value}, {fmt_count(t.done)} of "
            f"{fmt_count(t.total)} tiles done. The heat map shows the tiles done so far; "
            "the summary is written when the last tile ends."
        )
    return f"<div class='state' data-state='{_e(state.value)}'>{_e(text)}</div>"


def _figure(overlay: Overlay | None, image_note: str | None) -> str:
    if overlay is None:
        note = image_note or "No thumbnail yet: it is rendered when the slide is planned."
        return f"<figure><div class='missing'>{_e(note)}</div></figure>"
    data = base64.b64encode(overlay.png).decode("ascii")
    if overlay.scale_top is None:
        legend = "<div class='legend'>No detections in the tiles done so far.</div>"
    else:
        ramp = (
            f"background: linear-gradient(to right, {_rgba(HEAT_LOW, ALPHA_LOW)}, "
            f"{_rgba(HEAT_HIGH, ALPHA_HIGH)})"
        )
        legend = (
            "<div class='legend'><span>fewer</span>"
            f"<span class='ramp' style='{ramp}'></span>"
            f"<span>{_e(f'{overlay.scale_top:,.1f}')} {_e(overlay.unit)} or more</span></div>"
        )
    return (
        "<figure>"
        f"<img id='overlay' alt='Slide thumbnail with detection density' "
        f"width='{overlay.width}' height='{overlay.height}' src='data:image/png;base64,{data}'>"
        f"{legend}<figcaption>Each tile's core is coloured by its {_e(overlay.unit)} "
        "(all classes); uncoloured tissue had none, or is not done yet.</figcaption>"
        "</figure>"
    )


def _summary(slide: SlideOut) -> str:
    summary = slide.summary
    if summary is None:
        return "<p class='missing'>No summary yet: it is written when the last tile ends.</p>"
    area = summary.tissue_area_mm2
    head = (
        "<table class='meta'>"
        f"<tr><th>Tissue area</th><td data-field='tissue_area_mm2' data-value='{area!r}'>"
        f"{_e(fmt_area_mm2(area))} mm²</td></tr>"
    )
    if summary.steatosis_band is not None:
        head += (
            "<tr><th>Steatosis band (NASH CRN)</th>"
            f"<td data-field='steatosis_band'>{_e(summary.steatosis_band)} "
            "(screening figure; research use only)</td></tr>"
        )
    head += "</table>"
    rows = []
    for c in summary.classes:
        swatch = f"<span class='swatch' style='background: rgb{class_color(c.label)}'></span>"
        rows.append(
            f"<tr data-class='{_e(c.label)}'><td>{swatch}{_e(c.label)}</td>"
            f"<td class='num' data-field='count' data-value='{c.count}'>"
            f"{_e(fmt_count(c.count))}</td>"
            f"<td class='num' data-field='per_mm2' data-value='{c.per_mm2!r}'>"
            f"{_e(fmt_per_mm2(c.per_mm2))}</td>"
            f"<td class='num' data-field='area_fraction' data-value='{c.area_fraction!r}'>"
            f"{_e(fmt_fraction(c.area_fraction))}</td></tr>"
        )
    if not rows:
        rows.append("<tr><td colspan='4'>No classes.</td></tr>")
    return (
        head + "<table class='figures'><thead><tr><th>Class</th><th class='num'>Count</th>"
        "<th class='num'>Per mm² of tissue</th><th class='num'>Area fraction</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table>"
    )


def render_report(
    slide: SlideOut,
    overlay: Overlay | None,
    *,
    model_version: str | None,
    generated_at: datetime,
    image_note: str | None = None,
) -> str:
    """The report page of ``slide``. ``overlay`` None: no thumbnail to show, and
    ``image_note`` says why (default: not planned yet)."""
    finished = slide.state in SLIDE_TERMINAL_STATES
    body = (
        "<header><h1>Whole-slide report</h1>"
        f"<p class='sub'>{_e(slide.filename)} · slide {_e(slide.id)} · "
        f"state <strong data-field='state'>{_e(slide.state.value)}</strong></p></header>"
        f"<div class='notice' role='note'>{_e(NOTICE)}</div>"
        f"{_state_note(slide)}"
        f"<h2>Detection density</h2>{_figure(overlay, image_note)}"
        "<div class='cols'>"
        f"<div><h2>Slide</h2>{_metadata(slide, model_version)}</div>"
        f"<div><h2>Summary{'' if finished else ' (not finished)'}</h2>{_summary(slide)}</div>"
        "</div>"
        f"<footer>Generated {_e(_when(generated_at))} by HepatoAI. {_e(NOTICE)}: the "
        "figures are model output, not a diagnosis. No label, macro or scanner metadata of "
        "the slide is shown.</footer>"
    )
    return PAGE.substitute(title=_e(f"Slide report: {slide.filename}"), style=STYLE, body=body)
