"""Detections as files pathologists open: QuPath GeoJSON, COCO detection JSON and CSV.

Pure text builders (no FastAPI, no database): each takes the images of an export, in
order, and yields the file a piece at a time, so a batch with 100,000 detections never
sits in memory; routes.exports reads the images and streams the pieces."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hepato.common.results import Box


class ExportFormat(StrEnum):
    geojson = "geojson"
    coco = "coco"
    csv = "csv"


MEDIA_TYPES = {
    ExportFormat.geojson: "application/geo+json",
    ExportFormat.coco: "application/json",
    ExportFormat.csv: "text/csv; charset=utf-8",
}
SUFFIXES = {
    ExportFormat.geojson: ".geojson",
    ExportFormat.coco: ".coco.json",
    ExportFormat.csv: ".csv",
}
# Okabe-Ito colours: told apart under the common colour-vision deficiencies.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "fibrosis": (0, 114, 178),
    "inflammation": (213, 94, 0),
    "steatosis": (240, 228, 66),
    "ballooning": (204, 121, 167),
}
CSV_HEADER = (
    "job_id",
    "filename",
    "width",
    "height",
    "label",
    "class_id",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
)
# Spreadsheets run a cell starting with one of these as a formula; filenames are client text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CHUNK_CHARS = 64 * 1024


@dataclass(frozen=True)
class Image:
    """One done detect job: an image and its boxes."""

    job_id: uuid.UUID
    filename: str
    width: int
    height: int
    boxes: list[Box]


def class_color(label: str) -> tuple[int, int, int]:
    """The class's fixed colour; any other label gets one derived from its name, so it
    is the same in every export."""
    if label in CLASS_COLORS:
        return CLASS_COLORS[label]
    r, g, b = hashlib.sha256(label.encode()).digest()[:3]
    return r, g, b


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def qupath_feature(image: Image, index: int, box: Box) -> dict[str, Any]:
    """One box as QuPath (0.4+) writes a detection: a closed rectangle in pixels of the
    original image (origin top left), its class with a colour, measurements as a map."""
    ring = [[box.x1, box.y1], [box.x2, box.y1], [box.x2, box.y2], [box.x1, box.y2]]
    return {
        "type": "Feature",
        # Derived, not random: exporting twice gives the same ids, so re-imports match.
        "id": str(uuid.uuid5(image.job_id, str(index))),
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": box.label, "color": list(class_color(box.label))},
            "measurements": {"score": box.score},
            "image": {"job_id": str(image.job_id), "filename": image.filename},
        },
    }


def geojson_pieces(images: Iterable[Image]) -> Iterator[str]:
    yield '{"type":"FeatureCollection","features":['
    sep = ""
    for image in images:
        for index, box in enumerate(image.boxes):
            yield sep + _dumps(qupath_feature(image, index, box))
            sep = ","
    yield "]}"


def coco_pieces(
    images: Iterable[Image], labels: Sequence[str], info: dict[str, Any]
) -> Iterator[str]:
    """COCO detection JSON. Annotations stream as they are read; the images (one short
    entry per image, not per box) and the categories follow them, so one pass over the
    jobs gives ids that agree even while the batch is still finishing."""
    yield '{"info":' + _dumps(info) + ',"annotations":['
    image_entries: list[str] = []
    names = dict(enumerate(labels))
    ann_id = 0
    for image_id, image in enumerate(images, start=1):
        image_entries.append(
            _dumps(
                {
                    "id": image_id,
                    "file_name": image.filename,
                    "width": image.width,
                    "height": image.height,
                    "job_id": str(image.job_id),
                }
            )
        )
        for box in image.boxes:
            ann_id += 1
            names.setdefault(box.class_id, box.label)
            w, h = box.x2 - box.x1, box.y2 - box.y1
            annotation = {
                "id": ann_id,
                "image_id": image_id,
                # 0 is "background" to many COCO tools: category ids are class ids + 1.
                "category_id": box.class_id + 1,
                "bbox": [box.x1, box.y1, w, h],
                "area": w * h,
                "iscrowd": 0,
                "score": box.score,
            }
            yield ("," if ann_id > 1 else "") + _dumps(annotation)
    yield '],"images":['
    for i, entry in enumerate(image_entries):
        yield ("," if i else "") + entry
    categories = [{"id": cid + 1, "name": name} for cid, name in sorted(names.items())]
    yield '],"categories":' + _dumps(categories) + "}"


def _cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_pieces(images: Iterable[Image]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for image in images:
        name = _cell(image.filename)
        for b in image.boxes:
            row = (b.label, b.class_id, b.score, b.x1, b.y1, b.x2, b.y2)
            writer.writerow((image.job_id, name, image.width, image.height, *row))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def chunked(pieces: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[bytes]:
    """Join small pieces into chunks of about ``size`` characters: one network write per
    chunk rather than per box."""
    parts: list[str] = []
    held = 0
    for piece in pieces:
        parts.append(piece)
        held += len(piece)
        if held >= size:
            yield "".join(parts).encode()
            parts, held = [], 0
    if parts:
        yield "".join(parts).encode()
