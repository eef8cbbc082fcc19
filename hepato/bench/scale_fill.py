"""The tables ``hepato bench scale`` measures against: finished filler jobs (and their
events) written in Postgres by ``INSERT ... SELECT generate_series``, never through the
API, and the empty baseline database each filled run is paired with."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, make_url, text

from hepato.bench import report
from hepato.common import ids, partitions
from hepato.common.migrate import run_migrations

FILLER_MODEL = "filler-detector"
FILLER_TENANT = "filler-lab"
# The empty table each filled run is compared with: a second database on the same server,
# measured turn about with the filled one (see hepato.bench.scale.run_scale).
BASELINE_DB = "hepato_scale_baseline"

_FILL = text(
    """
WITH j AS (
    INSERT INTO jobs (id, tenant, filename, object_key, image_format, size_bytes, width,
        height, model, model_version, task, priority, state, attempts, max_attempts,
        worker_id, lease_token, created_at, enqueued_at, started_at, fetched_at,
        inferred_at, finished_at, batch_size, queue_wait_ms, inference_ms, result,
        stages, kind)
    SELECT {id}, CAST(:tenant AS text), 'tile_' || g || '.png',
        'uploads/' || CAST(:tenant AS text) || '/' || md5(g::text) || '.png', 'png',
        120000 + g % 60000, 640, 640, CAST(:model AS text), '1', 'detect', 'routine', 'done', 1, 3,
        'filler-worker-' || g % 16, gen_random_uuid(), t, t, t + interval '2 s',
        t + interval '2.1 s', t + interval '2.4 s', t + interval '2.5 s', 32, 2000.0,
        300.0,
        jsonb_build_object('boxes', jsonb_build_array(jsonb_build_object(
            'label', 'nucleus', 'score', 0.9, 'x0', g % 600, 'y0', g % 590,
            'x1', g % 600 + 40, 'y1', g % 590 + 50))),
        '{"upload": 3.1, "download": 2.0, "decode": 1.2, "write": 4.0}'::jsonb, 'image'
    FROM (SELECT g, now() - (CAST(:stop AS bigint) - g) * interval '50 ms' AS t
          FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint) - 1) AS g) AS s
    RETURNING id, tenant, finished_at
)
INSERT INTO job_events (job_id, batch_id, tenant, state, error, at)
SELECT j.id, NULL, j.tenant,
    (ARRAY['done', 'processing', 'pending'])[1 + (e + 2) % 3], NULL, j.finished_at
FROM j CROSS JOIN generate_series(1, CAST(:events AS int)) AS e
""".replace("{id}", ids.uuid7_sql("t"))
)


def filled(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM jobs WHERE model = :m"), {"m": FILLER_MODEL}
            ).scalar_one()
        )


def fill_to(engine: Engine, rows: int, chunk: int, events_per_job: int) -> dict[str, Any]:
    """Add finished filler jobs (and their events) until ``rows`` are there, in chunks
    of one statement each, then VACUUM ANALYZE as autovacuum would have by then."""
    have = filled(engine)
    started = time.perf_counter()
    # Ids of their finish time, as real jobs' are of theirs: the filler lands in the
    # day partitions of the hours before now, made here as upkeep would have.
    first = (datetime.now(UTC) - timedelta(milliseconds=50 * chunk)).date()
    for day in partitions.wanted_days((datetime.now(UTC).date() - first).days, first):
        with engine.begin() as conn:
            partitions.create_day(conn, day)
    for start in range(have, rows, chunk):
        stop = min(rows, start + chunk)
        with engine.begin() as conn:
            conn.execute(
                _FILL,
                {
                    "tenant": FILLER_TENANT,
                    "model": FILLER_MODEL,
                    "start": start,
                    "stop": stop,
                    "events": events_per_job,
                },
            )
        report.console.print(f"  scale: jobs filled to {stop:,} rows")
    inserted_s = time.perf_counter() - started
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
        conn.execute(text("VACUUM ANALYZE job_events"))
        sizes = conn.execute(
            text(
                # Partitioned: the parents hold nothing, their partitions everything.
                "SELECT (SELECT sum(pg_total_relation_size(relid))::bigint"
                " FROM pg_partition_tree('jobs')),"
                " (SELECT sum(pg_total_relation_size(relid))::bigint"
                " FROM pg_partition_tree('job_events')),"
                " (SELECT count(*) FROM job_events)"
            )
        ).one()
    return {
        "rows": rows,
        "added": rows - have,
        "insert_s": round(inserted_s, 1),
        "vacuum_s": round(time.perf_counter() - started - inserted_s, 1),
        "jobs_mb": round(sizes[0] / 2**20, 1),
        "job_events_mb": round(sizes[1] / 2**20, 1),
        "job_events_rows": int(sizes[2]),
    }


def baseline_database(engine: Engine) -> str:
    """The baseline database next to the bench's own, created once and migrated: its URL."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        there = conn.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": BASELINE_DB}
        ).first()
        if not there:
            conn.execute(text(f'CREATE DATABASE "{BASELINE_DB}"'))
    url = make_url(engine.url).set(database=BASELINE_DB).render_as_string(hide_password=False)
    run_migrations(url)
    return url
