"""Detections by region (GET /v1/slides/{id}/detections), on the real services.

On the planted slide: a viewport around an object answers exactly it, at its level-0
place, with the GeoJSON export's id; the filters; a density grid past the limit whose
counts are the planted ones. On two slides written straight into Postgres, one with
100,000 boxes and one with 100: the same viewport costs about the same on both, because
the query visits only the viewport's tiles through ix_jobs_tile_grid (checked by EXPLAIN)."""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.orm import Session

from hepato.common import ids, tenants
from hepato.common.db import get_engine, insert_rows
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job, Slide
from hepato.gateway.routes.slide_regions import boxes_query, density_query, tile_window
from tests.e2e.test_slides import TOLERANCE_PX, features, submit
from tests.slides import planted

Json = dict[str, Any]
HALF = planted.OBJECT // 2


def detections(client: TestClient, slide_id: str, **params: Any) -> Json:
    r = client.get(f"/v1/slides/{slide_id}/detections", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def whole(**params: Any) -> dict[str, Any]:
    return {"x": 0, "y": 0, "w": planted.WIDTH, "h": planted.HEIGHT, **params}


def test_a_viewport_answers_the_objects_in_it_as_the_export_names_them(
    slide_client: TestClient,
    run_slide_workers: Callable[..., None],
    slide_settings: Settings,
    tmp_path: Path,
) -> None:
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    run_slide_workers(1)
    with get_engine(slide_settings.database_url).connect() as conn:
        grid = conn.execute(
            select(Slide.tile_w0, Slide.tile_h0, Slide.tile_stride_x, Slide.tile_stride_y).where(
                Slide.id == slide_id
            )
        ).one()
    assert tuple(grid) == (256, 256, 192, 192)  # planted.py: 256 px tiles every 192 px
    exported = {f["id"]: f for f in features(slide_client, slide_id)}

    for x, y, label in planted.OBJECTS:
        got = detections(slide_client, slide_id, x=x - 30, y=y - 30, w=60, h=60)
        assert got["mode"] == "boxes" and got["count"] == len(got["boxes"]) == 1, (x, y, got)
        box = got["boxes"][0]
        assert box["label"] == label and box["score"] == 0.9
        assert abs((box["x1"] + box["x2"]) / 2 - x) <= TOLERANCE_PX
        assert abs((box["y1"] + box["y2"]) / 2 - y) <= TOLERANCE_PX
        # The same detection, by id and place, as the GeoJSON export.
        ring = exported[box["id"]]["geometry"]["coordinates"][0]  # type: ignore[index]
        assert ring[0] == [box["x1"], box["y1"]] and ring[2] == [box["x2"], box["y2"]]

    # A box the viewport's edge cuts is answered (its centre lies outside the viewport).
    x, y, _ = planted.OBJECTS[6]
    cut = detections(slide_client, slide_id, x=x + HALF - 8, y=y + HALF - 8, w=100, h=100)
    assert [b["label"] for b in cut["boxes"]] == ["inflammation"]
    # Empty glass, a viewport off the slide, and one past its corner hold nothing.
    for params in (
        {"x": 1600, "y": 300, "w": 500, "h": 500},
        {"x": -500, "y": -500, "w": 400, "h": 400},
        {"x": planted.WIDTH, "y": 0, "w": 10, "h": 10},
    ):
        assert detections(slide_client, slide_id, **params) == {
            "mode": "boxes",
            "boxes": [],
            "count": 0,
        }

    everything = detections(slide_client, slide_id, **whole())
    assert everything["mode"] == "boxes"
    assert {b["id"] for b in everything["boxes"]} == set(exported)


def test_labels_and_min_score_filter_and_past_the_limit_a_density_grid(
    slide_client: TestClient, run_slide_workers: Callable[..., None], tmp_path: Path
) -> None:
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    run_slide_workers(1)
    planted_counts = Counter(label for *_, label in planted.OBJECTS)

    for label, n in planted_counts.items():
        got = detections(slide_client, slide_id, **whole(labels=label))
        assert got["count"] == n and {b["label"] for b in got["boxes"]} == {label}
    both = detections(slide_client, slide_id, **whole(labels="steatosis, inflammation"))
    assert both["count"] == len(planted.OBJECTS)
    assert detections(slide_client, slide_id, **whole(labels="nothing"))["count"] == 0
    assert detections(slide_client, slide_id, **whole(min_score=0.5))["count"] == 8
    assert detections(slide_client, slide_id, **whole(min_score=0.95))["count"] == 0

    # Whole slide, a limit under its 8 objects: counts per cell and class instead.
    grid = detections(slide_client, slide_id, **whole(limit=3))
    assert grid["mode"] == "density" and grid["count"] == len(planted.OBJECTS)
    assert grid["cell"] % 192 == 0  # whole tile strides
    summed: Counter[str] = Counter()
    for cell in grid["cells"]:
        assert cell["x"] % grid["cell"] == 0 and cell["y"] % grid["cell"] == 0
        assert cell["w"] == cell["h"] == grid["cell"]
        summed.update(cell["counts"])
    assert summed == planted_counts
    # Each object is counted in the cell holding the centre of the core it lies in,
    # at most one core away from its own place.
    for x, y, label in planted.OBJECTS:
        assert any(
            c["counts"].get(label)
            and c["x"] - 192 <= x < c["x"] + c["w"] + 192
            and c["y"] - 192 <= y < c["y"] + c["h"] + 192
            for c in grid["cells"]
        )

    steatosis = detections(slide_client, slide_id, **whole(limit=3, labels="steatosis"))
    assert steatosis["mode"] == "density"
    assert steatosis["count"] == planted_counts["steatosis"]
    assert all(set(c["counts"]) == {"steatosis"} for c in steatosis["cells"])
    # The labels decide: 3 inflammation boxes fit a limit of 3.
    inflammation = detections(slide_client, slide_id, **whole(limit=3, labels="inflammation"))
    assert inflammation["mode"] == "boxes" and inflammation["count"] == 3

    bad = slide_client.get(f"/v1/slides/{slide_id}/detections", params=whole(limit=20001))
    assert bad.status_code == 422
    bad = slide_client.get(f"/v1/slides/{slide_id}/detections", params=whole(w=0))
    assert bad.status_code == 422


# --- the cost does not grow with the slide ------------------------------------------------

TILE, STRIDE, OVERLAP = 256, 192, 64
COLS, ROWS = 80, 50  # 4,000 tiles
PER_TILE = 25  # boxes: 100,000 on the full grid, 100 on four tiles
# A viewport that meets exactly the tiles of columns 40-41 and rows 25-26.
VIEW = {"x": 40 * STRIDE + 64, "y": 25 * STRIDE + 64, "w": 320, "h": 320}
FOUR = [(c, r) for r in (25, 26) for c in (40, 41)]


def _core(i: int, n: int, length: int) -> tuple[int, int]:
    return (0 if i == 0 else i * STRIDE + OVERLAP // 2), (
        length if i == n - 1 else (i + 1) * STRIDE + OVERLAP // 2
    )


def _store_slide(engine: Engine, tiles: list[tuple[int, int]]) -> uuid.UUID:
    """A finished slide of ``tiles`` (column, row), PER_TILE boxes in each tile's core,
    written as the planner and the workers would leave it."""
    slide_id = uuid.uuid4()
    width, height = (COLS - 1) * STRIDE + TILE, (ROWS - 1) * STRIDE + TILE
    tenant = tenants.PUBLIC_TENANT
    per_row: dict[str, list[Any]] = {
        k: []
        for k in (
            "id",
            "tile_x",
            "tile_y",
            "core_x0",
            "core_y0",
            "core_x1",
            "core_y1",
            "result",
            "tile_stats",
        )
    }
    for col, row in tiles:
        (cx0, cx1), (cy0, cy1) = _core(col, COLS, width), _core(row, ROWS, height)
        found = []
        for k in range(PER_TILE):
            label, class_id = ("steatosis", 0) if k % 2 else ("inflammation", 1)
            bx, by = cx0 + 36 + (k % 5) * 28, cy0 + 36 + (k // 5) * 28
            found.append(
                {"label": label, "class_id": class_id, "score": 0.5 + k / 100,
                 "x1": bx, "y1": by, "x2": bx + 10.0, "y2": by + 10.0}
            )  # fmt: skip
        counts = Counter(b["label"] for b in found)
        for name, value in (
            ("id", ids.new_job_id()),  # a tile's id, as planning makes it
            ("tile_x", col * STRIDE),
            ("tile_y", row * STRIDE),
            ("core_x0", cx0),
            ("core_y0", cy0),
            ("core_x1", cx1),
            ("core_y1", cy1),
            ("result", {"task": "detect", "boxes": found}),
            ("tile_stats", {"classes": {k: {"count": n, "cover": 0.0} for k, n in counts.items()}}),
        ):
            per_row[name].append(value)
    same = {
        "batch_id": slide_id,
        "kind": "tile",
        "tenant": tenant,
        "filename": "stored.tiff",
        "object_key": f"slides/{slide_id.hex}.tiff",
        "image_format": "generic-tiff",
        "size_bytes": 0,
        "width": TILE,
        "height": TILE,
        "tile_w": TILE,
        "tile_h": TILE,
        "model": "blobs",
        "task": "detect",
        "priority": "routine",
        "state": "done",
        "attempts": 1,
        "max_attempts": 3,
    }
    with engine.begin() as conn:
        conn.execute(
            insert(Batch).values(
                id=slide_id, tenant=tenant, model="blobs", priority="routine", total=len(tiles)
            )
        )
        conn.execute(
            insert(Slide).values(
                id=slide_id,
                tenant=tenant,
                filename="stored.tiff",
                object_key=f"slides/{slide_id.hex}.tiff",
                format="generic-tiff",
                size_bytes=0,
                model="blobs",
                priority="routine",
                state="done",
                deidentify=False,
                deidentified=False,
                width=width,
                height=height,
                levels=1,
                mpp_x=0.5,
                mpp_y=0.5,
                tile_size=128,
                tile_overlap=32,
                tile_w0=TILE,
                tile_h0=TILE,
                tile_stride_x=STRIDE,
                tile_stride_y=STRIDE,
                tiles_total=len(tiles),
            )
        )
        insert_rows(conn, Job, per_row, same)
    return slide_id


def _plans(engine: Engine, slide_id: uuid.UUID) -> Iterator[Json]:
    """Every node of the EXPLAIN plans of the region query's two statements."""
    with Session(engine) as session:
        slide = session.get_one(Slide, slide_id)
    with engine.connect() as conn:
        window = tile_window(slide, **VIEW)
        assert window is not None and window.rows == [25 * STRIDE, 26 * STRIDE]
        for query, params in (
            density_query(slide_id, window, None, window.unit),
            boxes_query(slide_id, window, ["steatosis"], 0.5, 2000),
        ):
            plan = conn.execute(text("EXPLAIN (FORMAT JSON) " + query.text), params).scalar_one()
            stack = [plan[0]["Plan"]]
            while stack:
                node = stack.pop()
                stack.extend(node.get("Plans", []))
                yield node


def test_a_viewport_costs_the_same_on_100_000_boxes_as_on_100(
    slide_client: TestClient, slide_settings: Settings
) -> None:
    engine = get_engine(slide_settings.database_url)
    big = _store_slide(engine, [(c, r) for r in range(ROWS) for c in range(COLS)])
    small = _store_slide(engine, FOUR)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE jobs"))

    nodes = list(_plans(engine, big))
    # jobs is partitioned by day (common.partitions): its partitions are read, the
    # tiles' through its partition of the grid index.
    with engine.connect() as conn:
        tree = "SELECT c.relname FROM pg_partition_tree(CAST(:t AS regclass)) p"
        tree += " JOIN pg_class c ON c.oid = p.relid"
        jobs = set(conn.execute(text(tree), {"t": "jobs"}).scalars())
        grid = set(conn.execute(text(tree), {"t": "ix_jobs_tile_grid"}).scalars())
        # The partitions that hold the slide's tiles: read through the index. The
        # others (empty here) may be read by a Seq Scan of nothing.
        holding = set(
            conn.execute(
                text(
                    "SELECT DISTINCT c.relname FROM jobs j JOIN pg_class c"
                    " ON c.oid = j.tableoid WHERE j.batch_id = :b"
                ),
                {"b": big},
            ).scalars()
        )
    on_jobs = [n["Node Type"] for n in nodes if n.get("Relation Name") in holding]
    assert holding <= jobs and on_jobs and "Seq Scan" not in on_jobs, nodes
    # Index Scan, or Bitmap Index Scan under a Bitmap Heap Scan: on the grid index only.
    used = {n["Index Name"] for n in nodes if "Index Name" in n}
    assert used and used <= grid, nodes

    answers = {s: detections(slide_client, str(s), **VIEW) for s in (big, small)}
    assert answers[big]["count"] == answers[small]["count"] == 4 * PER_TILE
    assert detections(slide_client, str(big), **whole_big(limit=10))["count"] == 100_000

    times: dict[uuid.UUID, list[float]] = {big: [], small: []}
    for _ in range(15):
        for slide_id in (big, small):
            t0 = time.perf_counter()
            r = slide_client.get(f"/v1/slides/{slide_id}/detections", params=VIEW)
            times[slide_id].append(time.perf_counter() - t0)
            assert r.status_code == 200
    big_s, small_s = statistics.median(times[big]), statistics.median(times[small])
    assert big_s / small_s < 3, (big_s, small_s)

    # A slide planned before its stride was stored takes its rows as a range: same answer.
    with engine.begin() as conn:
        conn.execute(
            update(Slide).where(Slide.id == big).values(tile_stride_x=None, tile_stride_y=None)
        )
    assert detections(slide_client, str(big), **VIEW) == answers[big]


def whole_big(**params: Any) -> dict[str, Any]:
    return {"x": 0, "y": 0, "w": COLS * STRIDE + TILE, "h": ROWS * STRIDE + TILE, **params}


def test_feature_ids_are_the_exports_uuid5() -> None:
    from hepato.gateway.routes.slide_regions import feature_id

    for index in (0, 1, 9, 10, 12345):
        tile = uuid.uuid4()
        assert feature_id(tile.bytes, index) == str(uuid.uuid5(tile, str(index)))
