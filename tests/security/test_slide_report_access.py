"""Another tenant's slide has no report: ``GET /v1/slides/{id}/report`` answers it as an
unknown id (same status, same message), and shows nothing of it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.security import auth
from tests.security.auth import MakeClient, bearer
from tests.slides import planted

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of


def test_a_tenant_cannot_read_another_tenants_slide_report(
    make_client: MakeClient, key_of: Callable[[str], str], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "blobs.yaml").write_text(yaml.safe_dump(planted.MANIFEST))
    client = make_client(models_dir=models, default_model="blobs")
    a, b = bearer(key_of("tenant-a")), bearer(key_of("tenant-b"))
    path = planted.write_tiff(tmp_path / "secret-biopsy.tiff")
    with path.open("rb") as f:
        r = client.post("/v1/slides", files={"file": (path.name, f)}, headers=a)
    assert r.status_code == 202, r.text
    slide_id, missing = r.json()["slide_id"], str(uuid.uuid4())

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
