"""job state counts: jobs per model, tenant and state, kept by triggers (common.job_state_counts)

Statement-level triggers on ``jobs`` append what each INSERT, UPDATE and DELETE changed
to ``job_state_deltas`` (one row per model, tenant and state the statement moved, from
its transition tables); every ``FOLD_EVERY`` delta rows one writer folds them into
``job_state_counts``. A reader sums both tables, so a count is exact at its snapshot and
costs the same however many jobs there are. TRUNCATE of ``jobs`` empties both tables.

The first counts are taken here, with one scan of ``jobs`` under the lock CREATE TRIGGER
holds (writers wait for this migration's commit).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Delta rows between two folds; common.job_state_counts.FOLD_EVERY says the same.
FOLD_EVERY = 1024

# (trigger, event, referencing, delta rows of one statement)
TRACKERS = (
    (
        "insert",
        "INSERT",
        "NEW TABLE AS new_jobs",
        "SELECT model, tenant, state, count(*) FROM new_jobs GROUP BY model, tenant, state",
    ),
    (
        "delete",
        "DELETE",
        "OLD TABLE AS old_jobs",
        "SELECT model, tenant, state, -count(*) FROM old_jobs GROUP BY model, tenant, state",
    ),
    (
        "update",
        "UPDATE",
        "OLD TABLE AS old_jobs NEW TABLE AS new_jobs",
        # Only what moved: an UPDATE that leaves every state as it was adds no row.
        """SELECT model, tenant, state, sum(n) FROM (
               SELECT model, tenant, state, 1 AS n FROM new_jobs
               UNION ALL
               SELECT model, tenant, state, -1 AS n FROM old_jobs
           ) AS moved
           GROUP BY model, tenant, state HAVING sum(n) <> 0""",
    ),
)


def upgrade() -> None:
    op.create_table(
        "job_state_counts",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "tenant", "state"),
    )
    op.create_table(
        "job_state_deltas",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Rows come and go by the thousand: vacuumed after every fold or so, not after 20%
    # of a table that is always small.
    op.execute(
        "ALTER TABLE job_state_deltas SET (autovacuum_vacuum_threshold = 1000, "
        "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_insert_threshold = 1000, "
        "autovacuum_vacuum_insert_scale_factor = 0)"
    )
    # One folder at a time and never a wait: a writer that finds another folding (its
    # transaction still open) goes on, and the deltas wait for the next fold. The fold
    # runs only in READ COMMITTED, where each statement sees the previous fold's commit:
    # an older snapshot would delete rows another fold had already moved.
    op.execute("""
        CREATE FUNCTION job_state_counts_fold() RETURNS bigint LANGUAGE plpgsql AS $$
        DECLARE
            moved bigint;
        BEGIN
            IF current_setting('transaction_isolation') <> 'read committed'
               OR NOT pg_try_advisory_xact_lock(4711, 3) THEN
                RETURN 0;
            END IF;
            WITH gone AS (
                DELETE FROM job_state_deltas RETURNING model, tenant, state, n
            ), added AS (
                INSERT INTO job_state_counts AS c (model, tenant, state, n)
                SELECT model, tenant, state, sum(n) FROM gone GROUP BY model, tenant, state
                ON CONFLICT (model, tenant, state) DO UPDATE SET n = c.n + excluded.n
            )
            SELECT count(*) INTO moved FROM gone;
            RETURN moved;
        END
        $$
    """)
    # Ids are drawn one by one across every writer, so the statement that drew a
    # multiple of FOLD_EVERY (one per that many rows) is the one that folds.
    op.execute(f"""
        CREATE FUNCTION job_state_counts_fold_due(first_id bigint, last_id bigint)
        RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            IF last_id / {FOLD_EVERY} > (first_id - 1) / {FOLD_EVERY} THEN
                PERFORM job_state_counts_fold();
            END IF;
        END
        $$
    """)
    for name, event, referencing, deltas in TRACKERS:
        op.execute(f"""
            CREATE FUNCTION job_state_counts_on_{name}() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                first_id bigint;
                last_id bigint;
            BEGIN
                WITH added AS (
                    INSERT INTO job_state_deltas (model, tenant, state, n)
                    {deltas}
                    RETURNING id
                )
                SELECT min(id), max(id) INTO first_id, last_id FROM added;
                IF last_id IS NOT NULL THEN
                    PERFORM job_state_counts_fold_due(first_id, last_id);
                END IF;
                RETURN NULL;
            END
            $$
        """)
        op.execute(f"""
            CREATE TRIGGER job_state_counts_{name} AFTER {event} ON jobs
            REFERENCING {referencing}
            FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_on_{name}()
        """)
    op.execute("""
        CREATE FUNCTION job_state_counts_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM job_state_deltas;
            DELETE FROM job_state_counts;
            RETURN NULL;
        END
        $$
    """)
    op.execute("""
        CREATE TRIGGER job_state_counts_truncate AFTER TRUNCATE ON jobs
        FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_on_truncate()
    """)
    # Counting again from the table: here, and after anything that changes jobs without
    # the triggers seeing it (a restore, a table rewritten by a later migration).
    op.execute("""
        CREATE FUNCTION job_state_counts_rebuild() RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            LOCK TABLE jobs IN SHARE MODE;
            DELETE FROM job_state_deltas;
            DELETE FROM job_state_counts;
            INSERT INTO job_state_counts (model, tenant, state, n)
            SELECT model, tenant, state, count(*) FROM jobs GROUP BY model, tenant, state;
        END
        $$
    """)
    # Rows about to leave without a DELETE (a partition detached or dropped): their
    # counts taken off, in the transaction that removes them.
    op.execute("""
        CREATE FUNCTION job_state_counts_forget(source regclass) RETURNS void
        LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE format(
                'INSERT INTO job_state_deltas (model, tenant, state, n) '
                'SELECT model, tenant, state, -count(*) FROM %s '
                'GROUP BY model, tenant, state', source);
        END
        $$
    """)
    op.execute("SELECT job_state_counts_rebuild()")


def downgrade() -> None:
    op.execute("DROP TRIGGER job_state_counts_truncate ON jobs")
    op.execute("DROP FUNCTION job_state_counts_on_truncate()")
    for name, _event, _referencing, _deltas in TRACKERS:
        op.execute(f"DROP TRIGGER job_state_counts_{name} ON jobs")
        op.execute(f"DROP FUNCTION job_state_counts_on_{name}()")
    op.execute("DROP FUNCTION job_state_counts_forget(regclass)")
    op.execute("DROP FUNCTION job_state_counts_rebuild()")
    op.execute("DROP FUNCTION job_state_counts_fold_due(bigint, bigint)")
    op.execute("DROP FUNCTION job_state_counts_fold()")
    op.drop_table("job_state_deltas")
    op.drop_table("job_state_counts")
