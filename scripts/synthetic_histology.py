"""Procedural H&E-like liver histology tiles with box annotations for the demo detector.

Shared by ``train_demo_model.py`` (training/validation data) and ``make_samples.py``
(committed sample images), so both see exactly the same visual vocabulary.
Everything is driven by a ``numpy.random.Generator``: the same seed gives the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

# Order defines the YOLO class ids 0..3; the service and the trained weights rely on it.
CLASS_NAMES: tuple[str, ...] = ("fibrosis", "inflammation", "steatosis", "ballooning")

# (class_id, x1, y1, x2, y2) in pixels.
Box = tuple[int, float, float, float, float]
Color = tuple[float, float, float]

# RGB in [0, 1]. Hand-picked from typical H&E slides: eosin pinks, hematoxylin purples.
EOSIN: Color = (0.93, 0.66, 0.79)
CELL_BORDER: Color = (0.80, 0.48, 0.66)
HEMATOXYLIN: Color = (0.36, 0.22, 0.55)
LYMPHOCYTE: Color = (0.22, 0.11, 0.40)
# Collagen is lighter than parenchyma and streaked with darker fibres, so it stays
# visible after ultralytics' saturation augmentation removes most of the hue contrast.
COLLAGEN_BLUE: Color = (0.84, 0.87, 0.98)
COLLAGEN_PINK: Color = (0.98, 0.81, 0.90)
COLLAGEN_FIBRE: Color = (0.64, 0.52, 0.78)
FAT: Color = (0.97, 0.95, 0.97)
FAT_RIM: Color = (0.83, 0.50, 0.68)
BALLOON: Color = (0.97, 0.89, 0.94)
BALLOON_STRAND: Color = (0.86, 0.66, 0.79)


def _blend(img: np.ndarray, alpha: np.ndarray, color: Color | np.ndarray) -> None:
    """Alpha-composite ``color`` onto ``img`` in place (alpha is HxW in [0, 1])."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(color, dtype=np.float32)


def _soft(mask: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Blur a hard mask so edges look optical rather than rasterised."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _disc(size: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(
        mask, (round(cx), round(cy)), (max(1, round(rx)), max(1, round(ry))), angle, 0, 360, 1, -1
    )
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Hepatocyte sheet: Voronoi cells with faint borders, patchy eosin and scattered nuclei."""
    base = np.asarray(EOSIN, np.float32) * rng.uniform(0.95, 1.04, 3).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()

    # Patchy low-frequency staining intensity, as on real sections.
    low = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 12)
    img *= (1.0 + 0.05 * low / (np.abs(low).max() + 1e-6))[..., None]

    # Hepatocyte borders: boundaries between nearest-seed regions of a random point set.
    n_cells = int((size / rng.uniform(13, 18)) ** 2)
    seeds = rng.uniform(0, size, (n_cells, 2))
    canvas = np.ones((size, size), np.uint8)
    for x, y in seeds.astype(int):
        canvas[y, x] = 0
    _, labels = cv2.distanceTransformWithLabels(
        canvas, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL
    )
    border = np.zeros((size, size), bool)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= labels[1:, :] != labels[:-1, :]
    _blend(img, _soft(border, 0.6) * 0.45, CELL_BORDER)

    # Per-cell cytoplasm shade plus fine granular texture.
    shade = rng.uniform(0.96, 1.04, labels.max() + 1).astype(np.float32)
    img *= shade[labels][..., None]
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 1.0)
    img *= (1.0 + 0.05 * grain)[..., None]

    # Sinusoids: a few thin pale slits, also hard negatives for the vacuole class.
    for _ in range(rng.integers(3, 8)):
        p0 = rng.uniform(0, size, 2)
        p1 = p0 + rng.uniform(-40, 40, 2)
        slit = np.zeros((size, size), np.uint8)
        cv2.line(slit, tuple(p0.astype(int)), tuple(p1.astype(int)), 1, int(rng.integers(1, 3)))
        _blend(img, _soft(slit, 0.7) * 0.6, FAT)

    # Hepatocyte nuclei near roughly half of the cell centres.
    for x, y in seeds[rng.random(n_cells) < 0.5]:
        r = rng.uniform(2.5, 4.2)
        nucleus = _disc(size, x, y, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, 180))
        _blend(img, _soft(nucleus, 0.7) * rng.uniform(0.65, 0.9), HEMATOXYLIN)
    return img


def _fibrosis(rng: np.random.Generator, size: int, img: np.ndarray) -> np.ndarray:
    """Fusiform collagen septum: parallel pale-blue/pink fibres with spindle nuclei."""
    # Thick, short, tapered bands within ~15 degrees of an image axis. A thin diagonal
    # streak leaves its box mostly empty and a uniform band has no visible ends; both
    # are learnt far too slowly by a from-scratch YOLO on a CPU budget.
    length, width = rng.uniform(35, 85), rng.uniform(18, 30)
    centre = rng.uniform(0.2 * size, 0.8 * size, 2)
    angle = rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.26, 0.26)
    bend = rng.uniform(-0.006, 0.006)
    t = np.linspace(-1, 1, 64)
    theta = angle + bend * t * length / 2
    pts = centre + np.stack([np.cos(theta), np.sin(theta)], 1) * (t * length / 2)[:, None]
    normals = np.stack([-np.sin(theta), np.cos(theta)], 1)
    taper = np.sqrt(np.clip(1 - np.abs(t) ** 3, 0.06, 1))[:, None]

    band = np.zeros((size, size), np.uint8)
    for (x, y), k in zip(pts, taper[:, 0], strict=True):
        cv2.circle(band, (round(x), round(y)), max(2, round(width / 2 * k)), 1, -1)
    # Mixed pale-blue/pink base so the band contrasts with eosin-pink parenchyma.
    base = np.asarray(COLLAGEN_PINK) + rng.uniform(0.4, 0.8) * np.subtract(
        COLLAGEN_BLUE, COLLAGEN_PINK
    )
    _blend(img, _soft(band, 1.2) * 0.9, base.astype(np.float32))
    for off in np.linspace(-width / 2.3, width / 2.3, int(width // 2)):
        fibre = np.zeros((size, size), np.uint8)
        wavy = pts + normals * taper * (off + rng.normal(0, 0.6, (len(pts), 1)))
        cv2.polylines(fibre, [wavy.astype(np.int32)], False, 1, 1)
        colour = COLLAGEN_FIBRE if rng.random() < 0.5 else COLLAGEN_BLUE
        _blend(img, _soft(fibre, 0.5) * rng.uniform(0.5, 0.9), colour)
    for i in rng.integers(8, len(pts) - 8, rng.integers(3, 8)):
        x, y = pts[i] + normals[i] * taper[i] * rng.uniform(-width / 3, width / 3)
        spindle = _disc(size, x, y, rng.uniform(4, 6), 1.5, np.degrees(theta[i]))
        _blend(img, _soft(spindle, 0.6) * 0.8, HEMATOXYLIN)
    return band


def _inflammation(rng: np.random.Generator, size: int, img: np.ndarray) -> np.ndarray:
    """Tight cluster of small, very dark, round lymphocyte nuclei."""
    radius = rng.uniform(10, 26)
    centre = rng.uniform(radius, size - radius, 2)
    n = int(rng.integers(22, 34) * (radius / 16) ** 1.2)
    offsets = rng.normal(0, radius / 2.2, (n, 2))
    offsets = offsets[np.linalg.norm(offsets, axis=1) < radius]
    cluster = np.zeros((size, size), np.uint8)
    for x, y in centre + offsets:
        r = rng.uniform(2.0, 3.4)
        cell = _disc(size, x, y, r, r)
        cluster |= cell
        _blend(img, _soft(cell, 0.6) * rng.uniform(0.8, 0.95), LYMPHOCYTE)
    return cluster


def _steatosis(rng: np.random.Generator, size: int, img: np.ndarray) -> np.ndarray:
    """Clear fat vacuole with a thin pink rim, sometimes with a nucleus pushed to the edge."""
    r = rng.uniform(6, 30)
    cx, cy = rng.uniform(r, size - r, 2)
    ry, ang = r * rng.uniform(0.82, 1.0), rng.uniform(0, 180)
    vacuole = _disc(size, cx, cy, r, ry, ang)
    rim = np.zeros((size, size), np.uint8)
    cv2.ellipse(rim, (round(cx), round(cy)), (round(r), round(ry)), ang, 0, 360, 1, 1 + int(r > 16))
    tint = np.asarray(FAT, np.float32) * rng.uniform(0.98, 1.02)
    _blend(img, _soft(vacuole, 0.7), np.clip(tint, 0, 1))
    _blend(img, _soft(rim, 0.6) * 0.8, FAT_RIM)
    if r > 12 and rng.random() < 0.35:
        phi = rng.uniform(0, 2 * np.pi)
        crescent = _disc(
            size, cx + r * np.cos(phi), cy + r * np.sin(phi), 5, 2, np.degrees(phi) + 90
        )
        _blend(img, _soft(crescent, 0.6) * 0.85, HEMATOXYLIN)
    return vacuole | rim


def _ballooning(rng: np.random.Generator, size: int, img: np.ndarray) -> np.ndarray:
    """Swollen pale hepatocyte: wispy rarefied cytoplasm, distinct membrane, central nucleus."""
    r = rng.uniform(15, 30)
    cx, cy = rng.uniform(r, size - r, 2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
    radii = r * rng.uniform(0.85, 1.1, 14)
    poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
    cell = np.zeros((size, size), np.uint8)
    cv2.fillPoly(cell, [poly], 1)
    _blend(img, _soft(cell, 0.9), BALLOON)

    # Rarefaction: thin reticular strands where smooth noise crosses zero.
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 2.5)
    strands = (np.abs(noise) < 0.25 * noise.std()) & (cell > 0)
    _blend(img, _soft(strands, 0.5) * 0.55, BALLOON_STRAND)

    membrane = np.zeros((size, size), np.uint8)
    cv2.polylines(membrane, [poly], True, 1, 1)
    _blend(img, _soft(membrane, 0.6) * 0.7, CELL_BORDER)
    nr = rng.uniform(4, 6.5)
    nucleus = _disc(
        size, cx + rng.normal(0, 1.5), cy + rng.normal(0, 1.5), nr, nr * rng.uniform(0.8, 1.0)
    )
    _blend(img, _soft(nucleus, 0.7) * 0.85, HEMATOXYLIN)
    _blend(img, _disc(size, cx, cy, 1.2, 1.2).astype(np.float32) * 0.6, LYMPHOCYTE)
    return cell | membrane


Painter = Callable[[np.random.Generator, int, np.ndarray], np.ndarray]
_PAINTERS: tuple[Painter, ...] = (_fibrosis, _inflammation, _steatosis, _ballooning)
# Inclusive (min, max) object count per image for each class. Every tile gets fibrosis:
# large, sparse boxes are the slowest class to learn from scratch on a short CPU budget.
_COUNTS: tuple[tuple[int, int], ...] = ((1, 3), (1, 3), (2, 7), (1, 3))


def generate_image(rng: np.random.Generator, size: int = 320) -> tuple[np.ndarray, list[Box]]:
    """Render one RGB uint8 tile and its boxes ``(class_id, x1, y1, x2, y2)`` in pixels."""
    img = _background(rng, size)
    occupied = np.zeros((size, size), bool)
    boxes: list[Box] = []

    plan = [cls for cls, (lo, hi) in enumerate(_COUNTS) for _ in range(rng.integers(lo, hi + 1))]
    for cls in plan:
        # Paint on a scratch copy and keep it only if it does not hide an earlier object,
        # so every label stays visible and boxes never describe occluded pixels.
        for _ in range(20):
            trial = img.copy()
            mask = _PAINTERS[cls](rng, size, trial) > 0
            area = int(mask.sum())
            if area < 40 or (mask & occupied).sum() > 0.03 * area:
                continue
            ys, xs = np.nonzero(mask)
            img = trial
            occupied |= cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            boxes.append(
                (cls, float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            )
            break

    # Slide-to-slide stain variation in optical-density space (Beer-Lambert), so
    # unstained fat stays white while the pinks and purples drift.
    density = -np.log(np.clip(img, 1e-3, 1.0)) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    img = np.exp(-density * rng.uniform(0.85, 1.2))
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img += rng.normal(0, 0.012, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), boxes


def yolo_label_lines(boxes: list[Box], size: int) -> list[str]:
    """Boxes as normalised ``cls cx cy w h`` lines in YOLO txt format."""
    lines = []
    for cls, x1, y1, x2, y2 in boxes:
        cx, cy, w, h = (
            (x1 + x2) / 2 / size,
            (y1 + y2) / 2 / size,
            (x2 - x1) / size,
            (y2 - y1) / size,
        )
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def tile_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream per tile, so tile ``index`` does not depend on how many came before."""
    return np.random.default_rng([seed, index])
