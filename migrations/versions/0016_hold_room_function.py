"""the queue bounds' check as functions: hepato_pending and hepato_hold_room

``hepato_pending(model, tenant)`` is the count common.room reads (a model's pending jobs,
every tenant's and one tenant's, from the counts of migration 0012), now in one place.
``hepato_hold_room(model, tenant, adding, per_model, per_tenant)`` takes the model's
room lock (an advisory lock held to the end of the transaction), then counts, and raises
SQLSTATE HQ001 (DETAIL: "everyone,mine") when ``adding`` more would pass a bound, or
returns the model's pending jobs. It is VOLATILE, so under READ COMMITTED its count
sees what the lock's previous holder committed, even called from within a statement
that began before the lock was granted: the submission of one image holds its room,
inserts its job with its first event and writes its audit row in one statement.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION hepato_pending(p_model text, p_tenant text,
                                       OUT everyone bigint, OUT mine bigint)
        LANGUAGE sql STABLE AS $$
            SELECT coalesce(sum(n), 0)::bigint,
                   coalesce(sum(n) FILTER (WHERE tenant = p_tenant), 0)::bigint
            FROM (
                SELECT tenant, n FROM job_state_counts
                WHERE model = p_model AND state = 'pending'
                UNION ALL
                SELECT tenant, n FROM job_state_deltas
                WHERE model = p_model AND state = 'pending'
            ) AS counted
        $$
    """)
    op.execute("""
        CREATE FUNCTION hepato_hold_room(p_model text, p_tenant text, p_adding bigint,
                                         p_per_model bigint, p_per_tenant bigint)
        RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            counted record;
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('room:' || p_model));
            SELECT * INTO counted FROM hepato_pending(p_model, p_tenant);
            IF counted.everyone + p_adding > p_per_model
               OR counted.mine + p_adding > p_per_tenant THEN
                RAISE EXCEPTION 'queue full' USING ERRCODE = 'HQ001',
                    DETAIL = counted.everyone || ',' || counted.mine;
            END IF;
            RETURN counted.everyone;
        END
        $$
    """)


def downgrade() -> None:
    op.execute("DROP FUNCTION hepato_hold_room(text, text, bigint, bigint, bigint)")
    op.execute("DROP FUNCTION hepato_pending(text, text)")
