"""Migration 0015 on a database that holds jobs and events of before it (UUIDv4 ids):
every row kept and readable through ``jobs`` and ``job_events``, in the legacy, default
or day partition its id belongs to (a v4 id that falls in today's range moved into
today's), the counts unchanged and right, the ORM and the schema alike; then the
downgrade puts the same rows back in plain tables, and the upgrade runs again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from hepato.common import ids, job_state_counts, partitions
from hepato.common.migrate import migrations_dir
from hepato.common.tables import Base

JOBS = 3000


@pytest.fixture
def database(service_env: dict[str, str]) -> Iterator[tuple[Config, Engine]]:
    """A new database on the test Postgres, migrated to 0014 (before partitioning)."""
    url = make_url(service_env["HEPATO_DATABASE_URL"])
    name = f"hepato_parts_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    target = url.set(database=name)
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = target.render_as_string(hide_password=False)
    engine = create_engine(target)
    try:
        command.upgrade(config, "0014")
        yield config, engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def today_v4() -> uuid.UUID:
    """A v4 id (random, version 4) whose first 48 bits fall in today's range."""
    ms = int(datetime.now(UTC).timestamp() * 1000) - 1000
    return uuid.UUID(int=(ms << 80) | (uuid.uuid4().int & ((1 << 80) - 1)))


def old_rows(engine: Engine) -> uuid.UUID:
    """JOBS v4 jobs (a third done, in 3 batches) with two events each, and one whose id
    falls in today's range; that one's id."""
    planted = today_v4()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant, model, priority, total)"
                " SELECT gen_random_uuid(), 'lab', 'm', 'routine', 0 FROM generate_series(1, 3)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, batch_id, tenant, filename, object_key, image_format,"
                " size_bytes, width, height, model, task, priority, state, attempts,"
                " max_attempts)"
                " SELECT CASE WHEN g = 0 THEN CAST(:planted AS uuid) ELSE gen_random_uuid() END,"
                " (SELECT id FROM batches ORDER BY id OFFSET g % 3 LIMIT 1), 'lab', 'f.png',"
                " 'uploads/old/' || g, 'png', 1, 1, 1, 'm', 'detect', 'routine',"
                " CASE WHEN g % 3 = 0 THEN 'done' ELSE 'pending' END, 0, 3"
                " FROM generate_series(0, :n - 1) AS g"
            ),
            {"planted": planted, "n": JOBS},
        )
        for state in ("pending", "done"):
            conn.execute(
                text(
                    "INSERT INTO job_events (job_id, batch_id, tenant, state)"
                    " SELECT id, batch_id, tenant, :state FROM jobs"
                ),
                {"state": state},
            )
    return planted


def snapshot(engine: Engine) -> tuple[set[tuple[str, str]], list[tuple[str, str, int]]]:
    with engine.connect() as conn:
        jobs = {(str(i), s) for i, s in conn.execute(text("SELECT id, state FROM jobs"))}
        events = conn.execute(
            text("SELECT job_id::text, state, id FROM job_events ORDER BY id")
        ).all()
    return jobs, [tuple(e) for e in events]


def where(engine: Engine, table: str) -> dict[str, int]:
    """Rows of a partitioned ``table`` per partition (bare name)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT c.relname, count(*) FROM {table} t JOIN pg_class c"
                " ON c.oid = t.tableoid GROUP BY 1"
            )
        )
        return {name: n for name, n in rows}


def assert_counts_right(engine: Engine) -> None:
    with engine.connect() as conn:
        counted = {k: n for k, n in job_state_counts.totals(conn).items() if n}
        truth = conn.execute(text("SELECT model, state, count(*) FROM jobs GROUP BY 1, 2"))
        assert counted == {(m, s): n for m, s, n in truth}


def test_the_migration_keeps_old_jobs_and_events_and_downgrades(
    database: tuple[Config, Engine],
) -> None:
    config, engine = database
    planted = old_rows(engine)
    before = snapshot(engine)
    assert_counts_right(engine)

    command.upgrade(config, "head")

    assert snapshot(engine) == before
    assert_counts_right(engine)
    today = partitions.wanted_days(0)[0]
    jobs, events = where(engine, "jobs"), where(engine, "job_events")
    assert sum(jobs.values()) == JOBS and sum(events.values()) == 2 * JOBS
    # Most old ids are in the legacy range; the rest in the default; the planted one
    # (and its events) moved into today's partition when it was made.
    assert jobs["jobs_legacy"] > 0.9 * JOBS and jobs["jobs_default"] > 0
    assert jobs[f"jobs_p{today:%Y%m%d}"] == 1 and events[f"job_events_p{today:%Y%m%d}"] == 2
    assert events["job_events_legacy"] == 2 * jobs["jobs_legacy"]
    assert events["job_events_default"] == 2 * jobs["jobs_default"]
    with engine.begin() as conn:
        # Each partition of jobs keeps its events' cascade.
        legacy = conn.execute(
            text("SELECT id FROM job_partitions.jobs_legacy LIMIT 1")
        ).scalar_one()
        for job in (planted, legacy):
            conn.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": job})
            left = "SELECT count(*) FROM job_events WHERE job_id = :id"
            assert conn.execute(text(left), {"id": job}).scalar_one() == 0
        # A new job lands in its day, and the counts' triggers fire on the parent.
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant, filename, object_key, image_format, size_bytes,"
                " width, height, model, task, priority, state, attempts, max_attempts)"
                " VALUES (:id, 'lab', 'f', 'k', 'png', 1, 1, 1, 'm', 'detect', 'routine',"
                " 'pending', 0, 3)"
            ),
            {"id": ids.new_job_id()},
        )
    assert where(engine, "jobs")[f"jobs_p{today:%Y%m%d}"] == 1
    assert_counts_right(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    after = snapshot(engine)

    command.downgrade(config, "0014")

    assert snapshot(engine) == after
    assert_counts_right(engine)
    with engine.connect() as conn:
        kinds = conn.execute(
            text(
                "SELECT relname, relkind FROM pg_class WHERE relname IN ('jobs', 'job_events')"
                " AND relnamespace = 'public'::regnamespace"
            )
        ).all()
        assert sorted(kinds) == [("job_events", "r"), ("jobs", "r")]
        schema = text("SELECT 1 FROM pg_namespace WHERE nspname = :s")
        assert conn.execute(schema, {"s": partitions.SCHEMA}).first() is None
        # Events still go with their job.
        gone = conn.execute(text("SELECT id FROM jobs LIMIT 1")).scalar_one()
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": gone})
        left = "SELECT count(*) FROM job_events WHERE job_id = :id"
        assert conn.execute(text(left), {"id": gone}).scalar_one() == 0

    command.upgrade(config, "head")
    assert sum(where(engine, "jobs").values()) == len(after[0]) - 1
    assert_counts_right(engine)
