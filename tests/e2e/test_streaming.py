"""The gateway's cost per submission: an upload streams from the spooled request to the
object store without being held in memory whole, and Postgres sees the same statements
for a request of one file as for one of twenty."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.gateway.app import create_app
from tests.e2e.test_pipeline import db_jobs, thirty_two, upload
from tests.listen import listening
from tests.security.files import MiB, measured
from tests.server import serve

pytestmark = pytest.mark.slow

# Under the default HEPATO_MAX_FILE_BYTES (50 MiB) and pixel limit.
BIG_SIDE = 3700  # 3700 x 3700 RGB, uncompressed: 41 MB
# What streaming may hold at once: a part of the object store client (5 MiB), Pillow's
# and the parser's buffers. Reading the file into memory would take BIG_SIDE² x 3.
HELD = 16 * MiB


def tiff(path: Path, side: int) -> Path:
    pixels = np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="TIFF")  # uncompressed: the size is the pixels
    return path


@pytest.fixture
def big_tiff(tmp_path: Path) -> Path:
    return tiff(tmp_path / "big.tif", BIG_SIDE)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_40_mb_upload_is_not_held_in_memory(
    settings: Settings, big_tiff: Path, tmp_path: Path
) -> None:
    size = big_tiff.stat().st_size
    assert 40_000_000 < size < settings.max_file_bytes
    # A baseline a quarter the size: what any upload costs (buffers, the parser, the
    # allocator's arenas, a loaded machine's noise) is in both; what grows with the size
    # is the difference. Held whole, the 30 MB between them would show in full.
    small = tiff(tmp_path / "small.tif", BIG_SIDE // 2)
    small_size = small.stat().st_size
    # A real server, and a client sending from disk: the TestClient would build the
    # whole body in this process, where it would count as the gateway's memory.
    costs = {}
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as http:
        warm = thirty_two()[0]  # first-request costs are not the upload's
        assert http.post("/v1/jobs", files={"file": (warm.name, warm.read_bytes())}).is_success
        for path in (small, big_tiff):
            with path.open("rb") as file, measured() as cost:
                response = http.post("/v1/jobs", files={"file": (path.name, file, "image/tiff")})
            assert response.status_code == 202, response.text
            costs[path.name] = cost
    cost = costs["big.tif"]
    per_byte = (cost.rss_growth - costs["small.tif"].rss_growth) / (size - small_size)
    print(f"{size / MiB:.0f} MiB upload: {cost}; baseline {costs['small.tif']}")
    print(f"resident growth per uploaded byte beyond the baseline: {per_byte:.3f}")
    assert cost.traced_peak < HELD, f"Python allocations peaked at {cost.traced_peak / MiB} MiB"
    # Streaming holds a fixed amount whatever the size (about 0); holding the upload
    # whole, once or as copies, costs at least one byte per byte.
    assert per_byte < 0.25, f"resident memory grows {per_byte:.2f} bytes per uploaded byte"
    (job,) = [j for j in db_jobs(settings) if j.filename == "big.tif"]
    assert (job.image_format, job.size_bytes) == ("tiff", size)
    assert (job.width, job.height) == (BIG_SIDE, BIG_SIDE)
    stored = ObjectStore(settings).get(job.object_key)
    assert sha256(stored) == sha256(big_tiff.read_bytes()), "the object is the upload, whole"


@contextmanager
def statements(engine: Engine) -> Iterator[Counter[str]]:
    """Every statement the engine's connections send, by its first words, with each
    transaction's COMMIT or ROLLBACK and each pool checkout (its pre-ping). An executemany
    counts once per parameter set: psycopg pipelines them into one round trip, but
    Postgres still runs a statement for each."""
    seen: Counter[str] = Counter()

    def on_execute(
        conn: Any, cursor: Any, sql: str, params: Any, context: Any, executemany: bool
    ) -> None:
        seen[" ".join(sql.split()[:3])] += len(params) if executemany else 1

    def on_commit(conn: Any) -> None:
        seen["COMMIT"] += 1

    def on_rollback(conn: Any) -> None:
        seen["ROLLBACK"] += 1

    def on_checkout(*_: Any) -> None:
        seen["checkout"] += 1

    hooks: list[tuple[Any, str, Callable[..., None]]] = [
        (engine, "before_cursor_execute", on_execute),
        (engine, "commit", on_commit),
        (engine, "rollback", on_rollback),
        (engine.pool, "checkout", on_checkout),
    ]
    with listening(hooks):
        yield seen


@pytest.mark.parametrize("route", ["/v1/batches", "/v1/assets"])
def test_postgres_sees_as_many_statements_for_20_files_as_for_2(
    client: TestClient, settings: Settings, route: str
) -> None:
    engine = get_engine(settings.database_url)
    files = thirty_two()
    assert client.post(route, files=upload(files[:1])).status_code == 202  # warm the pool
    counted = {}
    for n in (1, 2, 20):
        with statements(engine) as seen:
            response = client.post(route, files=upload(files[:n]))
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == n
        counted[n] = seen
    print({n: dict(seen) for n, seen in counted.items()})
    assert counted[2] == counted[20]
    # A fixed few: the room check before the uploads; then one transaction that takes the
    # room's lock, counts again (so concurrent requests cannot pass the bound together),
    # inserts the batch, and its jobs with their events in one statement.
    assert sum(counted[2].values()) <= 12, counted[2]
    # One file skips the check before the upload (the transaction's own count holds).
    up_front = Counter({"checkout": 1, "SELECT everyone, mine": 1, "ROLLBACK": 1})
    assert counted[1] + up_front == counted[2]
    assert len(db_jobs(settings)) == 1 + 1 + 2 + 20
