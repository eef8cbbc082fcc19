"""jobs and job_events partitioned by day (common.partitions), so retention drops a day

``jobs`` becomes RANGE partitioned on ``id`` and ``job_events`` on ``job_id``, with one
partition per UTC day of the (from now on UUIDv7, time-ordered) job ids, in the schema
``job_partitions``. What this does to the tables as they are, and what it costs:

- The old tables are not copied: each moves to ``job_partitions`` as ``jobs_legacy`` /
  ``job_events_legacy`` and is attached as the partition of ids from 2100-01-01's bound
  up. Their UUIDv4 ids are spread over the whole id space; the 1.5 % below that bound
  are moved (an index range scan, then copied) into the default partitions. Attaching
  reads each old table once (Postgres checks every row is in range), under the lock
  this migration holds: at 10^7 jobs, a sequential read of both tables.
- ``job_events`` gets the primary key (job_id, xid, id), which a partitioned table needs
  (its key must hold the partition key), and which replaces ix_job_events_job_xid, the
  job stream's read order: one index built on the old events table, one fewer to write.
- Every other index of ``jobs`` becomes a partitioned index; the old tables' indexes are
  adopted as its partitions (nothing rebuilt). The counts' triggers (0012) move to the
  new parent, where statements on ``jobs`` fire them as before; no job is added or
  removed here, so the counts stay as they are.
- The event-to-job foreign key is declared between the partitions of each day (see
  common.partitions): the old pair keeps the one it had.
- Today's and the next days' partitions are made (common.partitions.create_day).

Downgrade copies both tables back into plain ones (a full copy) and drops the schema.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 12:00:00
"""

from collections.abc import Sequence

from alembic import op

from hepato.common import ids, partitions

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = partitions.SCHEMA
# The upkeep's default (HEPATO_PARTITION_DAYS_AHEAD): made here too, so a stack that
# starts right after the migration has its days.
DAYS_AHEAD = 7
COUNTERS = ("insert", "update", "delete")
COUNTED = {
    "insert": "INSERT ON jobs REFERENCING NEW TABLE AS new_jobs",
    "update": "UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs",
    "delete": "DELETE ON jobs REFERENCING OLD TABLE AS old_jobs",
}
# 0014's indexes of jobs other than the primary key (name, definition).
JOB_INDEXES = (
    ("ix_jobs_tenant", "(tenant)"),
    ("ix_jobs_batch_state_created", "(batch_id, state, created_at, id)"),
    ("ix_jobs_state_enqueued", "(state, enqueued_at)"),
    ("ix_jobs_state_lease", "(state, lease_until)"),
    ("ix_jobs_model_state", "(model, state)"),
    ("ix_jobs_tile_grid", "(batch_id, tile_y, tile_x) WHERE kind = 'tile'"),
)


def _drop_counters() -> None:
    for name in (*COUNTERS, "truncate"):
        op.execute(f"DROP TRIGGER job_state_counts_{name} ON jobs")


def _create_counters() -> None:
    for name in COUNTERS:
        op.execute(
            f"CREATE TRIGGER job_state_counts_{name} AFTER {COUNTED[name]}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_on_{name}()"
        )
    op.execute(
        "CREATE TRIGGER job_state_counts_truncate AFTER TRUNCATE ON jobs"
        " FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_on_truncate()"
    )


def _job_indexes_and_keys() -> None:
    op.execute("ALTER TABLE jobs ADD CONSTRAINT jobs_pkey PRIMARY KEY (id)")
    op.execute(
        "ALTER TABLE jobs ADD CONSTRAINT jobs_batch_id_fkey FOREIGN KEY (batch_id)"
        " REFERENCES batches (id) ON DELETE CASCADE"
    )
    for name, definition in JOB_INDEXES:
        op.execute(f"CREATE INDEX {name} ON jobs {definition}")
    op.execute("CREATE INDEX ix_job_events_batch_xid ON job_events (batch_id, xid, id)")


def upgrade() -> None:
    legacy_from = ids.day_bound(partitions.LEGACY_FROM)
    op.execute(f"CREATE SCHEMA {S}")
    _drop_counters()
    for table in ("jobs", "job_events"):
        op.execute(f"ALTER TABLE {table} SET SCHEMA {S}")
        op.execute(f"ALTER TABLE {S}.{table} RENAME TO {table}_legacy")
    # The old events' key, as the parent's will be; their (job_id, xid, id) index is it.
    op.execute(f"ALTER TABLE {S}.job_events_legacy DROP CONSTRAINT job_events_pkey")
    op.execute(
        f"ALTER TABLE {S}.job_events_legacy ADD CONSTRAINT job_events_legacy_pkey"
        " PRIMARY KEY (job_id, xid, id)"
    )
    op.execute(f"DROP INDEX {S}.ix_job_events_job_xid")

    op.execute(
        f"CREATE TABLE jobs (LIKE {S}.jobs_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        " PARTITION BY RANGE (id)"
    )
    op.execute(
        f"CREATE TABLE job_events (LIKE {S}.job_events_legacy INCLUDING DEFAULTS"
        " INCLUDING CONSTRAINTS) PARTITION BY RANGE (job_id)"
    )
    op.execute(
        "ALTER TABLE job_events ADD CONSTRAINT job_events_pkey PRIMARY KEY (job_id, xid, id)"
    )
    # SET SCHEMA took the id sequence along with its owner: back, owned by the parent.
    op.execute(f"ALTER SEQUENCE {S}.job_events_id_seq OWNED BY NONE")
    op.execute(f"ALTER SEQUENCE {S}.job_events_id_seq SET SCHEMA public")
    op.execute("ALTER SEQUENCE job_events_id_seq OWNED BY job_events.id")
    _job_indexes_and_keys()

    op.execute(f"CREATE TABLE {partitions.JOBS_DEFAULT} PARTITION OF jobs DEFAULT")
    op.execute(f"CREATE TABLE {partitions.EVENTS_DEFAULT} PARTITION OF job_events DEFAULT")
    op.execute(
        f"ALTER TABLE {partitions.EVENTS_DEFAULT} ADD CONSTRAINT job_events_default_job_id_fkey"
        f" FOREIGN KEY (job_id) REFERENCES {partitions.JOBS_DEFAULT} (id) ON DELETE CASCADE"
    )
    # Old rows below the legacy range: into the defaults (jobs first, for the key).
    below = f"< '{legacy_from}'"
    op.execute(
        f"INSERT INTO {partitions.JOBS_DEFAULT} SELECT * FROM {S}.jobs_legacy WHERE id {below}"
    )
    op.execute(
        f"INSERT INTO {partitions.EVENTS_DEFAULT}"
        f" SELECT * FROM {S}.job_events_legacy WHERE job_id {below}"
    )
    op.execute(f"DELETE FROM {S}.job_events_legacy WHERE job_id {below}")
    op.execute(f"DELETE FROM {S}.jobs_legacy WHERE id {below}")
    for table in ("jobs", "job_events"):
        op.execute(
            f"ALTER TABLE {table} ATTACH PARTITION {S}.{table}_legacy"
            f" FOR VALUES FROM ('{legacy_from}') TO (MAXVALUE)"
        )
    _create_counters()
    conn = op.get_bind()
    for day in partitions.wanted_days(DAYS_AHEAD):
        partitions.create_day(conn, day)


def downgrade() -> None:
    _drop_counters()
    for table in ("jobs", "job_events"):
        op.execute(
            f"CREATE TABLE {table}_flat (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        op.execute(f"INSERT INTO {table}_flat SELECT * FROM {table}")
    op.execute("ALTER SEQUENCE job_events_id_seq OWNED BY NONE")
    op.execute("DROP TABLE job_events")
    op.execute("DROP TABLE jobs")
    op.execute(f"DROP SCHEMA {S}")
    for table in ("jobs", "job_events"):
        op.execute(f"ALTER TABLE {table}_flat RENAME TO {table}")
    op.execute("ALTER SEQUENCE job_events_id_seq OWNED BY job_events.id")
    _job_indexes_and_keys()
    op.execute("ALTER TABLE job_events ADD CONSTRAINT job_events_pkey PRIMARY KEY (id)")
    op.execute(
        "ALTER TABLE job_events ADD CONSTRAINT job_events_job_id_fkey FOREIGN KEY (job_id)"
        " REFERENCES jobs (id) ON DELETE CASCADE"
    )
    op.execute("CREATE INDEX ix_job_events_job_xid ON job_events (job_id, xid, id)")
    _create_counters()
