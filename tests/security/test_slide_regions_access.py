"""Another tenant's slide has no regions: its detections by region answer 404, the same
answer as for an id that does not exist, so slide ids cannot be probed through it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.security import auth
from tests.security.auth import MakeClient, tenant_slide
from tests.slides import planted

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of

VIEW: dict[str, Any] = {"x": 0, "y": 0, "w": planted.WIDTH, "h": planted.HEIGHT}


def test_a_tenant_cannot_query_another_tenants_slide_regions(
    make_client: MakeClient, key_of: Callable[[str], str], tmp_path: Path
) -> None:
    path = planted.write_tiff(tmp_path / "biopsy.tiff")
    ts = tenant_slide(make_client, key_of, tmp_path, path)
    client, a, b, slide_id, missing = ts.client, ts.owner, ts.other, ts.slide_id, ts.missing

    params: dict[str, Any]
    for params in (VIEW, {**VIEW, "limit": 1, "labels": "steatosis", "min_score": 0.5}):
        theirs = client.get(f"/v1/slides/{slide_id}/detections", params=params, headers=b)
        unknown = client.get(f"/v1/slides/{missing}/detections", params=params, headers=b)
        assert theirs.status_code == unknown.status_code == 404, theirs.text
        assert theirs.json()["detail"] == unknown.json()["detail"].replace(missing, slide_id)
    # Without a key, or with none valid: 401 before the slide is looked up.
    assert client.get(f"/v1/slides/{slide_id}/detections", params=VIEW).status_code == 401
    # The owner reads it (not planned yet: nothing in it).
    mine = client.get(f"/v1/slides/{slide_id}/detections", params=VIEW, headers=a)
    assert mine.status_code == 200, mine.text
    assert mine.json() == {"mode": "boxes", "boxes": [], "count": 0}
