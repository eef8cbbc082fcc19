"""Another tenant's slide is no slide at all: every slide call answers it as an unknown
id, and nothing of it is listed, canceled or served."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, select

from hepato.common.tables import Job
from tests.security import auth
from tests.security.auth import MakeClient, tenant_slide
from tests.slides import planted

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of


def test_a_tenant_cannot_see_cancel_or_export_another_tenants_slide(
    make_client: MakeClient, engine: Engine, key_of: Callable[[str], str], tmp_path: Path
) -> None:
    path = planted.write_tiff(tmp_path / "biopsy.tiff")
    ts = tenant_slide(make_client, key_of, tmp_path, path)
    client, a, b, slide_id, missing = ts.client, ts.owner, ts.other, ts.slide_id, ts.missing

    calls = [("GET", s) for s in ("", "/events", "/export", "/thumbnail", "/tissue_mask")]
    for method, suffix in [*calls, ("DELETE", "")]:
        theirs = client.request(method, f"/v1/slides/{slide_id}{suffix}", headers=b)
        unknown = client.request(method, f"/v1/slides/{missing}{suffix}", headers=b)
        assert theirs.status_code == unknown.status_code == 404, (method, suffix)
        assert theirs.json()["detail"] == unknown.json()["detail"].replace(missing, slide_id)
    assert client.get("/v1/slides", headers=b).json() == {"slides": []}
    with engine.connect() as conn:
        assert conn.execute(select(Job.state)).scalars().all() == ["pending"]
    assert [s["id"] for s in client.get("/v1/slides", headers=a).json()["slides"]] == [slide_id]
    assert client.get(f"/v1/slides/{slide_id}", headers=a).json()["state"] == "pending"
