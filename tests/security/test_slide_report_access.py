"""Another tenant's slide has no report: ``GET /v1/slides/{id}/report`` answers it as an
unknown id (same status, same message), and shows nothing of it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.security import auth
from tests.security.auth import MakeClient, tenant_slide
from tests.slides import planted

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of


def test_a_tenant_cannot_read_another_tenants_slide_report(
    make_client: MakeClient, key_of: Callable[[str], str], tmp_path: Path
) -> None:
    path = planted.write_tiff(tmp_path / "secret-biopsy.tiff")
    ts = tenant_slide(make_client, key_of, tmp_path, path)
    client, a, b, slide_id, missing = ts.client, ts.owner, ts.other, ts.slide_id, ts.missing

    theirs = client.get(f"/v1/slides/{slide_id}/report", headers=b)
    unknown = client.get(f"/v1/slides/{missing}/report", headers=b)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["detail"] == unknown.json()["detail"].replace(missing, slide_id)
    assert "secret-biopsy" not in theirs.text
    malformed = client.get("/v1/slides/not-a-uuid/report", headers=b)
    assert malformed.status_code == 404
    assert malformed.json()["detail"] == unknown.json()["detail"].replace(missing, "not-a-uuid")

    # Without a key there is no report either; with the owner's key there is.
    assert client.get(f"/v1/slides/{slide_id}/report").status_code == 401
    mine = client.get(f"/v1/slides/{slide_id}/report", headers=a)
    assert mine.status_code == 200 and "secret-biopsy.tiff" in mine.text
