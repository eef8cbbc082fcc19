"""A large batch's export reads its pages through an index: with 10^5 jobs in the batch
(inserted by one INSERT ... SELECT, not through the API) and fresh statistics, the plan of
the very statement the export route runs, first page and a page deep in the batch, is an
ordered index scan that seeks to the page: no Seq Scan of jobs, no Sort. Checked for the
plan a first execution gets (its values known) and for the generic plan a prepared
statement switches to (psycopg prepares a query after a few runs on one connection).

``jobs`` is partitioned by day (common.partitions): the plan is a Merge Append of the
partitions' ordered scans of the index, the batch's rows all in its day's, the others'
empty at once; still no Sort, and a page reads no more rows than it sends (plus the one
each partition's scan looks ahead). The jobs' ids are UUIDv7 of their creation time, as
the gateway makes them, so the batch lands in its day's partition."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.dialects import postgresql

from hepato.common import ids, partitions
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job
from hepato.gateway.routes.exports import batch_scope, page_query

pytestmark = pytest.mark.slow

INDEX = "ix_jobs_batch_state_created"
BATCH_JOBS = 100_000
OTHER_JOBS = 50_000  # in 50 other batches: the export must pick its batch out
TENANT = "lab"
DAY = date(2026, 12, 1)
# Over a day, with equal times here and there (the keyset's id breaks them).
CREATED = "timestamptz '2026-12-01 00:00+00' + (g / 3) * interval '1 second'"


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(conn: Connection, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = conn.exec_driver_sql(sql, params or ()).scalar_one()
    plan: dict[str, Any] = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return plan


def index_partitions(conn: Connection) -> set[str]:
    """The names of INDEX's partitions, one per partition of jobs."""
    return set(
        conn.execute(
            text(
                "SELECT c.relname FROM pg_partition_tree(CAST(:index AS regclass)) t"
                " JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf"
            ),
            {"index": INDEX},
        ).scalars()
    )


def assert_seeks_through_the_index(
    plan: dict[str, Any], deep: bool, indexes: set[str]
) -> list[dict[str, Any]]:
    kinds = [n["Node Type"] for n in nodes(plan)]
    assert "Seq Scan" not in kinds, kinds
    assert not {"Sort", "Incremental Sort"} & set(kinds), kinds
    scans = [n for n in nodes(plan) if n.get("Index Name") in indexes]
    assert scans and {s["Node Type"] for s in scans} <= {"Index Scan", "Index Only Scan"}, kinds
    # Every partition read, if more than one, is read through INDEX, in its order.
    assert len(scans) == 1 or "Merge Append" in kinds, kinds
    assert len(scans) == len([n for n in nodes(plan) if "Relation Name" in n]), kinds
    for scan in scans:
        cond = scan["Index Cond"]
        assert "batch_id" in cond and "state" in cond, cond
        if deep:
            # The keyset is a condition of the index, not a filter on the earlier rows.
            assert "created_at" in cond and "id" in cond, cond
    return scans


@pytest.fixture
def big_batch(settings: Settings) -> Iterator[tuple[Batch, Connection]]:
    engine = get_engine(settings.database_url)
    batch = Batch(id=uuid.uuid4(), tenant=TENANT, model="hepato-yolov8n", priority="bulk")
    with engine.begin() as conn:
        partitions.create_day(conn, DAY)  # the batch's day, as upkeep would have made it
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
            text(
                f"""
                INSERT INTO jobs (id, batch_id, tenant, filename, object_key, image_format,
                                  size_bytes, width, height, model, task, priority, state,
                                  attempts, max_attempts, created_at, enqueued_at)
                SELECT {ids.uuid7_sql(CREATED)},
                       CASE WHEN g <= :n THEN CAST(:batch AS uuid)
                            ELSE (CAST(:others AS uuid[]))[1 + g % 50] END,
                       :tenant, 'tile_' || g || '.png', 'uploads/' || g || '.png', 'png',
                       1000, 320, 320, 'hepato-yolov8n', 'detect', 'bulk',
                       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'done' END,
                       1, 3,
                       {CREATED},
                       timestamptz '2026-12-01'
                FROM generate_series(1, :n + :m) AS g
            """
            ),
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
    indexes = index_partitions(conn)
    scans = assert_seeks_through_the_index(plan, deep, indexes)
    # One page read, not the batch up to it: every row the index gave was kept, less
    # the one row a Merge Append may read ahead in a partition.
    read = sum(scan["Actual Rows"] for scan in scans)
    assert page_size <= read <= page_size + len(scans), scans
    assert all(scan.get("Rows Removed by Filter", 0) == 0 for scan in scans), scans

    # The generic plan of the same statement, as a prepared statement would run it.
    generic = query.compile(dialect=postgresql.psycopg.dialect(paramstyle="numeric_dollar"))
    assert "$1" in str(generic)
    assert_seeks_through_the_index(
        explain(conn, "EXPLAIN (GENERIC_PLAN, COSTS OFF, FORMAT JSON) " + str(generic)),
        deep,
        indexes,
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
