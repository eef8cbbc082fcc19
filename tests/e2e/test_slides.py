"""Whole slides end to end, on the real services: a slide in through POST /v1/slides,
planned and tiled by workers, level-0 detections and a summary out.

The test model finds the planted squares of tests/slides/planted.py exactly, so every
check is against where each object was drawn: found once (never twice at a border, never
missed), at its level-0 place, whichever worker ran which tile."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job, Slide
from tests.slides import make, planted

TOLERANCE_PX = 4.0


def submit(client: TestClient, path: Path, **form: str) -> str:
    with path.open("rb") as f:
        r = client.post("/v1/slides", files={"file": (path.name, f)}, data=form)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status_url"].endswith(f"/v1/slides/{body['slide_id']}")
    return str(body["slide_id"])


def features(client: TestClient, slide_id: str) -> list[dict[str, object]]:
    r = client.get(f"/v1/slides/{slide_id}/export", params={"format": "geojson"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["type"] == "FeatureCollection"
    return list(doc["features"])


def centre(feature: dict[str, object]) -> tuple[float, float, str]:
    ring = feature["geometry"]["coordinates"][0]  # type: ignore[index]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    label = feature["properties"]["classification"]["name"]  # type: ignore[index]
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, label


def assert_planted_found_once(found: list[dict[str, object]]) -> None:
    centres = [centre(f) for f in found]
    for x, y, label in planted.OBJECTS:
        near = [
            c for c in centres if abs(c[0] - x) <= TOLERANCE_PX and abs(c[1] - y) <= TOLERANCE_PX
        ]
        assert len(near) == 1, f"object at ({x}, {y}) found {len(near)} times: {near}"
        assert near[0][2] == label
    assert len(centres) == len(planted.OBJECTS), centres


def geometry(found: list[dict[str, object]]) -> list[tuple[float, float, str]]:
    return sorted((round(x, 1), round(y, 1), label) for x, y, label in map(centre, found))


def test_a_slide_is_tiled_merged_and_summarised(
    slide_client: TestClient,
    run_slide_workers: Callable[..., None],
    slide_settings: Settings,
    tmp_path: Path,
) -> None:
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    pending = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert pending["state"] == "pending" and pending["format"] == "generic-tiff"
    run_slide_workers(1)

    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert slide["state"] == "done", slide
    assert (slide["width"], slide["height"]) == (planted.WIDTH, planted.HEIGHT)
    assert slide["mpp"] == [planted.MPP, planted.MPP] and slide["mpp_source"] == "slide"
    assert slide["levels"] == 3 and slide["tile_size"] == 128 and slide["tile_overlap"] == 32
    tiles = slide["tiles"]
    assert tiles["done"] == tiles["total"] > 0

    # The empty glass on the right gets no jobs: every tile's core touches tissue.
    with get_engine(slide_settings.database_url).connect() as conn:
        cores = (
            conn.execute(select(Job.core_x0).where(Job.batch_id == slide_id, Job.kind == "tile"))
            .scalars()
            .all()
        )
    full_grid = 12 * 8
    assert len(cores) == tiles["total"] < full_grid
    assert max(cores) < planted.TISSUE_RIGHT

    found = features(slide_client, slide_id)
    assert_planted_found_once(found)
    for f in found:
        assert f["properties"]["objectType"] == "detection"  # type: ignore[index]
        assert "score" in f["properties"]["measurements"]  # type: ignore[index]

    summary = slide["summary"]
    tissue_mm2 = planted.TISSUE_RIGHT * planted.HEIGHT * planted.MPP**2 / 1e6
    assert summary["tissue_area_mm2"] == pytest.approx(tissue_mm2, rel=0.05)
    by_class = {c["label"]: c for c in summary["classes"]}
    steatosis = sum(1 for *_, label in planted.OBJECTS if label == "steatosis")
    assert by_class["steatosis"]["count"] == steatosis
    assert by_class["inflammation"]["count"] == len(planted.OBJECTS) - steatosis
    assert by_class["steatosis"]["per_mm2"] == pytest.approx(steatosis / summary["tissue_area_mm2"])
    covered = steatosis * planted.OBJECT**2 * planted.MPP**2 / 1e6 / summary["tissue_area_mm2"]
    assert by_class["steatosis"]["area_fraction"] == pytest.approx(covered, rel=0.15)
    assert summary["steatosis_band"] == "<5%"
    assert "research use only" in summary["notice"].lower()

    # The CSV names every detection with the GeoJSON's ids; gzip when asked for.
    r = slide_client.get(
        f"/v1/slides/{slide_id}/export",
        params={"format": "csv"},
        headers={"Accept-Encoding": "gzip"},
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    rows = r.text.strip().splitlines()  # httpx has already un-gzipped it
    assert rows[0].startswith("feature_id,label")
    assert {row.split(",")[0] for row in rows[1:]} == {f["id"] for f in found}

    for part in ("thumbnail", "tissue_mask"):
        r = slide_client.get(f"/v1/slides/{slide_id}/{part}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        Image.open(io.BytesIO(r.content)).verify()
    mask = np.asarray(
        Image.open(io.BytesIO(slide_client.get(f"/v1/slides/{slide_id}/tissue_mask").content))
    )
    right = int(mask.shape[1] * 0.8)
    assert mask[:, right:].max() == 0 and mask[:, : mask.shape[1] // 2].mean() > 200

    events = slide_client.get(f"/v1/slides/{slide_id}/events").text
    last = [line for line in events.splitlines() if line.startswith("data:")][-1]
    assert json.loads(last[5:])["state"] == "done"


def test_three_workers_give_the_one_worker_result(
    slide_client: TestClient, run_slide_workers: Callable[..., None], tmp_path: Path
) -> None:
    path = planted.write_tiff(tmp_path / "biopsy.tiff")
    one = submit(slide_client, path)
    run_slide_workers(1)
    three = submit(slide_client, path)
    run_slide_workers(3, max_batch_size=2)
    a, b = features(slide_client, one), features(slide_client, three)
    assert_planted_found_once(b)
    assert geometry(a) == geometry(b)
    summaries = [slide_client.get(f"/v1/slides/{s}").json()["summary"] for s in (one, three)]
    assert summaries[0]["classes"] == summaries[1]["classes"]


@pytest.mark.parametrize("fmt", ["aperio-svs", "ome-tiff", "dicom"])
def test_other_formats_go_through(
    slide_client: TestClient, run_slide_workers: Callable[..., None], tmp_path: Path, fmt: str
) -> None:
    if fmt == "aperio-svs":
        path = planted.write_svs(tmp_path / "biopsy.svs")
    elif fmt == "ome-tiff":
        path = make.write_ome_tiff(tmp_path / "biopsy.ome.tiff")
    else:
        path = make.write_dicom(tmp_path / "dicom")
    slide_id = submit(slide_client, path)
    run_slide_workers(1)
    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert slide["format"] == fmt
    assert slide["state"] == "done", slide
    assert slide["tiles"]["total"] > 0
    if fmt == "aperio-svs":
        assert_planted_found_once(features(slide_client, slide_id))


def test_deidentify_replaces_the_slide_and_leaks_no_patient_data(
    slide_client: TestClient,
    run_slide_workers: Callable[..., None],
    slide_settings: Settings,
    tmp_path: Path,
) -> None:
    import openslide

    from hepato.common.storage import ObjectStore

    path = planted.write_svs(tmp_path / "Jane Doe 1234.svs", patient="Jane Doe")
    assert b"Jane Doe" in path.read_bytes()
    slide_id = submit(slide_client, path, deidentify="true")
    with get_engine(slide_settings.database_url).connect() as conn:
        original = conn.execute(select(Slide.object_key).where(Slide.id == slide_id)).scalar_one()
    run_slide_workers(1)
    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert slide["state"] == "done" and slide["deidentified"] is True
    with get_engine(slide_settings.database_url).connect() as conn:
        stored = conn.execute(select(Slide.object_key).where(Slide.id == slide_id)).scalar_one()
    store = ObjectStore(slide_settings)
    assert stored != original and not store.exists(original)
    data = store.get(stored)
    assert b"Jane Doe" not in data
    copy = tmp_path / "stored.svs"
    copy.write_bytes(data)
    with openslide.OpenSlide(copy) as reread:
        assert not {"label", "macro"} & set(reread.associated_images)
    assert_planted_found_once(features(slide_client, slide_id))
    # Nothing answered names the patient, except the filename the client chose.
    for part in ("", "/export", "/export?format=csv"):
        text = slide_client.get(f"/v1/slides/{slide_id}{part}").text
        assert "Jane Doe" not in text.replace(slide["filename"], "")


def test_a_slide_without_mpp_fails_unless_mpp_is_given(
    slide_client: TestClient, run_slide_workers: Callable[..., None], tmp_path: Path
) -> None:
    path = planted.write_tiff(tmp_path / "no-mpp.tiff", mpp=None)
    refused = submit(slide_client, path)
    given = submit(slide_client, path, mpp="0.5")
    run_slide_workers(1)
    slide = slide_client.get(f"/v1/slides/{refused}").json()
    assert slide["state"] == "failed" and "mpp" in slide["error"].lower()
    assert slide["tiles"]["total"] == 0
    slide = slide_client.get(f"/v1/slides/{given}").json()
    assert slide["state"] == "done" and slide["mpp_source"] == "submitted"
    assert_planted_found_once(features(slide_client, given))


def test_bad_slides_are_refused_naming_the_problem(
    slide_client: TestClient, tmp_path: Path
) -> None:
    whole = planted.write_tiff(tmp_path / "whole.tiff")
    cut = make.truncate(whole, tmp_path / "cut.tiff")
    with cut.open("rb") as f:
        r = slide_client.post("/v1/slides", files={"file": ("cut.tiff", f)})
    assert r.status_code in (415, 422) and "truncated" in r.json()["detail"]
    png = make.write_png(tmp_path / "tile.png")
    with png.open("rb") as f:
        r = slide_client.post("/v1/slides", files={"file": ("tile.png", f)})
    assert r.status_code in (415, 422) and "PNG" in r.json()["detail"]
    with whole.open("rb") as f:
        r = slide_client.post(
            "/v1/slides", files={"file": ("whole.tiff", f)}, data={"model": "nope"}
        )
    assert r.status_code == 422 and "unknown model" in r.json()["detail"]


def test_cancel_before_planning(slide_client: TestClient, tmp_path: Path) -> None:
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    r = slide_client.delete(f"/v1/slides/{slide_id}")
    assert r.status_code == 200 and r.json()["canceled"] == 1
    assert slide_client.get(f"/v1/slides/{slide_id}").json()["state"] == "canceled"
    assert slide_client.get("/v1/slides/00000000-0000-0000-0000-000000000000").status_code == 404


def test_gzip_body_is_gzip(slide_client: TestClient, tmp_path: Path) -> None:
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    with slide_client.stream(
        "GET", f"/v1/slides/{slide_id}/export", headers={"Accept-Encoding": "gzip"}
    ) as r:
        raw = b"".join(r.iter_raw())
    assert json.loads(gzip.decompress(raw)) == {"type": "FeatureCollection", "features": []}
