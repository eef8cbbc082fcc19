"""The audit trail of whole slides on the real services: the submission, the listing,
every read (state, Deep Zoom descriptor and tiles, a 304 included, regions, thumbnail,
tissue mask, export, report, the live stream) and the cancel leave one row each, naming
the slide and, for a tile or a region, where; another tenant's refused reads leave none,
and no row holds the slide's file name."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from hepato.common import tenants
from hepato.common.settings import Settings
from tests.e2e.test_audit import PATIENT, Row, audit_rows, brief, mark
from tests.security import auth
from tests.security.auth import bearer
from tests.slides import planted

engine = auth.engine

TOP = 12  # the planted slide's full-resolution Deep Zoom level (2304 px: 2^12 > 2304)


@pytest.fixture
def keyed_slide_client(slide_settings: Settings, engine: Engine) -> Iterator[TestClient]:
    from hepato.gateway.app import create_app

    with TestClient(create_app(slide_settings.model_copy(update={"auth": "required"}))) as c:
        yield c


def test_each_slide_call_leaves_one_row(
    keyed_slide_client: TestClient,
    engine: Engine,
    run_slide_workers: Callable[..., None],
    tmp_path: Path,
) -> None:
    client = keyed_slide_client
    a = tenants.create_key(engine, "audit-slides-a")
    b = tenants.create_key(engine, "audit-slides-b")
    ha, hb = bearer(a.key), bearer(b.key)
    start = mark(engine)
    path = planted.write_svs(tmp_path / f"{PATIENT}-liver.svs", patient=PATIENT)
    with path.open("rb") as f:
        accepted = client.post("/v1/slides", files={"file": (path.name, f)}, headers=ha)
    assert accepted.status_code == 202, accepted.text
    sid = accepted.json()["slide_id"]
    run_slide_workers(1)
    slide = f"/v1/slides/{sid}"

    def get(url: str, code: int = 200, **kwargs: Any) -> Any:
        response = client.get(url, **{"headers": ha, **kwargs})
        assert response.status_code == code, (url, response.text[:300])
        return response

    assert get("/v1/slides").json()["slides"][0]["id"] == sid
    assert get(slide).json()["state"] == "done"
    dzi = get(f"{slide}/dzi")
    get(f"{slide}/dzi", 304, headers={**ha, "If-None-Match": dzi.headers["etag"]})
    tile = get(f"{slide}/dzi_files/{TOP}/1_0.jpeg")
    assert tile.headers["content-type"] == "image/jpeg"
    get(
        f"{slide}/dzi_files/{TOP}/1_0.jpeg",
        304,
        headers={**ha, "If-None-Match": tile.headers["etag"]},
    )
    view = {"x": 0, "y": 0, "w": planted.WIDTH, "h": planted.HEIGHT}
    region = get(f"{slide}/detections", params=view).json()
    get(f"{slide}/thumbnail")
    get(f"{slide}/tissue_mask")
    get(f"{slide}/export", params={"format": "csv"})
    get(f"{slide}/report")
    get(f"{slide}/events")
    assert client.delete(slide, headers=ha).json()["canceled"] == 0

    # Refused: another tenant's key on each read, a tile out of range, no key at all.
    for suffix in ("", "/dzi", f"/dzi_files/{TOP}/0_0.jpeg", "/thumbnail", "/report", "/export"):
        assert client.get(f"{slide}{suffix}", headers=hb).status_code == 404, suffix
    assert client.delete(slide, headers=hb).status_code == 404
    get(f"{slide}/dzi_files/99/9_9.jpeg", 404)
    assert client.get(slide).status_code == 401
    assert client.get("/v1/slides", headers=hb).json() == {"slides": []}  # B's own listing

    rows = audit_rows(engine, start)
    own = [r for r in rows if r["tenant"] == "audit-slides-a"]
    expected: list[Row] = [
        ("submit", "slide", sid),
        ("list_slides", None, None),
        ("read_slide", "slide", sid),
        ("read_slide_dzi", "slide", sid),
        ("read_slide_dzi", "slide", sid),
        ("read_slide_tile", "slide", sid),
        ("read_slide_tile", "slide", sid),
        ("read_slide_region", "slide", sid),
        ("read_slide_image", "slide", sid),
        ("read_slide_image", "slide", sid),
        ("export", "slide", sid),
        ("read_report", "slide", sid),
        ("watch", "slide", sid),
        ("cancel", "slide", sid),
    ]
    assert brief(own) == expected
    assert {(r["key_id"], r["client"]) for r in own} == {(a.key_id, "testclient")}
    # B's only row is its own (empty) listing.
    assert [(r["tenant"], r["action"], r["detail"]) for r in rows if r not in own] == [
        ("audit-slides-b", "list_slides", {"count": 0})
    ]
    details = [r["detail"] for r in own]
    assert details[0] == {
        "format": "aperio-svs",
        "size_bytes": path.stat().st_size,
        "deidentify": False,
    }
    assert details[1] == {"count": 1}
    assert details[3:7] == [
        {},
        {"not_modified": True},
        {"level": TOP, "col": 1, "row": 0},
        {"level": TOP, "col": 1, "row": 0, "not_modified": True},
    ]
    assert details[7] == {**view, "mode": region["mode"], "count": region["count"]}
    assert [d["image"] for d in details[8:10]] == ["thumbnail", "tissue_mask"]
    assert details[10] == {"format": "csv"} and details[12] == {}  # watched from the start
    assert details[13] == {"canceled": 0}
    dumped = json.dumps([{k: str(v) for k, v in r.items()} for r in rows])
    assert PATIENT not in dumped and ".svs" not in dumped and a.key not in dumped
