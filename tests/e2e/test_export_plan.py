"""A large batch's export reads its pages through an index: with 10^5 jobs in the batch
(inserted by one INSERT ... SELECT, not through the API) and fresh statistics, the plan of
the very statement the export route runs, first page and a page deep in the batch, is an
ordered index scan that seeks to the page: no Seq Scan of jobs, no Sort. Checked for the
plan a first execution gets (its values known) and for the generic plan a prepared
statement switches to (psycopg prepares a query after a few runs on one connection)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.dialects import postgresql

from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job
from hepato.gateway.routes.exports import batch_scope, page_query

pytestmark = pytest.mark.slow

INDEX = "ix_jobs_batch_state_created"
BATCH_JOBS = 100_000
OTHER_JOBS = 50_000  # in 50 other batches: the export must pick its batch out
TENANT = "lab"


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(conn: Connection, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = conn.exec_driver_sql(sql, params or ()).scalar_one()
    plan: dict[str, Any] = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return plan


def assert_seeks_through_the_index(plan: dict[str, Any], deep: bool) -> dict[str, Any]:
    kinds = [n["Node Type"] for n in nodes(plan)]
    assert "Seq Scan" not in kinds, kinds
    assert not {"Sort", "Incremental Sort"} & set(kinds), kinds
    scans = [n for n in nodes(plan) if n.get("Index Name") == INDEX]
    assert [s["Node Type"] for s in scans] in (["Index Scan"], ["Index Only Scan"]), kinds
    cond = scans[0]["Index Cond"]
    assert "batch_id" in cond and "state" in cond, cond
    if deep:
        # The keyset is a condition of the index, not a filter on the batch's earlier rows.
        assert "created_at" in cond and "id" in cond, cond
    return scans[0]


@pytest.fixture
def big_batch(settings: Settings) -> Iterator[tuple[Batch, Connection]]:
    engine = get_engine(settings.database_url)
    batch = Batch(id=uuid.uuid4(), tenant=TENANT, model="hepato-yolov8n", priority="bulk")
    with engine.begin() as conn:
        others = [uuid.uuid4() for _ in range(50)]
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant, model, priority, total) "
                "SELECT unnest(CAST(:ids AS uuid[])), :tenant, 'hepato-yolov8n', 'bulk', 0"
            ),
            {"ids": [batch.id, *others], "tenant": TENANT},
        )
        # The batch's jobs, 1 in 10 failed, created over a day with equal times here and
        # there (the keyset's id breaks them); then the other batches' jobs.
        conn.execute(
            text("""
                INSERT INTO jobs (id, batch_id, tenant, filename, object_key, image_format,
                                  size_bytes, width, height, model, task, priority, state,
                                  attempts, max_attempts, created_at, enqueued_at)
                SELECT gen_random_uuid(),
                       CASE WHEN g <= :n THEN CAST(:batch AS uuid)
                            ELSE (CAST(:others AS uuid[]))[1 + g % 50] END,
                       :tenant, 'tile_' || g || '.png', 'uploads/' || g || '.png', 'png',
                       1000, 320, 320, 'hepato-yolov8n', 'detect', 'bulk',
                       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'done' END,
                       1, 3,
                       timestamptz '2026-12-01' + (g / 3) * interval '1 second',
                       timestamptz '2026-12-01'
                FROM generate_series(1, :n + :m) AS g
            """),
            {
                "n": BATCH_JOBS,
                "m": OTHER_JOBS,
                "batch": batch.id,
                "others": others,
                "tenant": TENANT,
            },
        )
        conn.execute(text("ANALYZE jobs"))
    with engine.connect() as conn:
        yield batch, conn


def keyset_at(conn: Connection, batch: Batch, position: int) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) of the batch's done job at ``position`` in export order."""
    query = page_query(batch_scope(batch), None, 1).offset(position)
    row = conn.execute(query).one()
    return row.created_at, row.id


@pytest.mark.parametrize("deep", [False, True], ids=["first page", "deep page"])
def test_a_large_batchs_export_pages_through_its_index(
    settings: Settings, big_batch: tuple[Batch, Connection], deep: bool
) -> None:
    batch, conn = big_batch
    page_size = settings.export_page_size
    after = keyset_at(conn, batch, 60_000) if deep else None
    query = page_query(batch_scope(batch), after, page_size)

    # As the route runs it (psycopg, values bound): planned for these values, and run.
    compiled = query.compile(dialect=conn.dialect)
    plan = explain(
        conn, "EXPLAIN (ANALYZE, COSTS OFF, FORMAT JSON) " + str(compiled), compiled.params
    )
    scan = assert_seeks_through_the_index(plan, deep)
    # One page read, not the batch up to it: every row the index gave was kept.
    assert scan["Actual Rows"] == page_size, scan
    assert scan.get("Rows Removed by Filter", 0) == 0, scan

    # The generic plan of the same statement, as a prepared statement would run it.
    generic = query.compile(dialect=postgresql.psycopg.dialect(paramstyle="numeric_dollar"))
    assert "$1" in str(generic)
    assert_seeks_through_the_index(
        explain(conn, "EXPLAIN (GENERIC_PLAN, COSTS OFF, FORMAT JSON) " + str(generic)), deep
    )

    # And the rows are the page: the next done jobs of the batch in (created_at, id) order.
    rows = conn.execute(query).all()
    expected = conn.execute(
        select(Job.created_at, Job.id)
        .where(Job.batch_id == batch.id, Job.state == "done")
        .order_by(Job.created_at, Job.id)
        .offset(60_001 if deep else 0)
        .limit(page_size)
    ).all()
    assert [(r.created_at, r.id) for r in rows] == [tuple(r) for r in expected]
