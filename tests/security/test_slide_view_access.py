"""Another tenant's slide has no deep-zoom tiles: its descriptor and tiles answer as an
unknown id's, and nothing of the slide is read for them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hepato.common.slides.reader import SlideReader
from tests.security import auth
from tests.security.auth import MakeClient, tenant_slide
from tests.slides import planted

engine = auth.engine
make_client = auth.make_client
key_of = auth.key_of


def test_a_tenant_cannot_view_another_tenants_slide(
    make_client: MakeClient,
    key_of: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = planted.write_svs(tmp_path / "biopsy.svs")
    ts = tenant_slide(make_client, key_of, tmp_path, path, slide_cache_dir=tmp_path / "cache")
    client, a, b, slide_id, missing = ts.client, ts.owner, ts.other, ts.slide_id, ts.missing

    reads: list[int] = []
    read_region = SlideReader.read_region

    def counting(self: SlideReader, *args: int) -> np.ndarray:
        reads.append(1)
        return read_region(self, *args)

    monkeypatch.setattr(SlideReader, "read_region", counting)
    suffixes = ("/dzi", "/dzi_files/12/0_0.jpeg", "/dzi_files/0/0_0.jpeg", "/dzi_files/99/9_9.jpeg")
    for suffix in suffixes:
        theirs = client.get(f"/v1/slides/{slide_id}{suffix}", headers=b)
        unknown = client.get(f"/v1/slides/{missing}{suffix}", headers=b)
        assert theirs.status_code == unknown.status_code == 404, suffix
        assert theirs.json()["detail"] == unknown.json()["detail"].replace(missing, slide_id)
        assert "etag" not in theirs.headers
        assert client.get(f"/v1/slides/{slide_id}{suffix}").status_code == 401, suffix
    assert reads == []

    # The owner sees them, and another tenant still does not once they are cached.
    assert client.get(f"/v1/slides/{slide_id}/dzi", headers=a).status_code == 200
    tile = client.get(f"/v1/slides/{slide_id}/dzi_files/12/0_0.jpeg", headers=a)
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    again = client.get(
        f"/v1/slides/{slide_id}/dzi_files/12/0_0.jpeg",
        headers={**b, "If-None-Match": tile.headers["etag"]},
    )
    assert again.status_code == 404 and again.content != tile.content
