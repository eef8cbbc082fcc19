"""export keyset index: a batch's jobs by state in (created_at, id) order

A batch's export reads its done jobs a page at a time, ordered by (created_at, id) and
resumed after the last page's keyset (gateway.routes.exports.page_query). With only
(batch_id, state) indexed, every page read all the batch's done jobs and sorted them, or
scanned the table: 10^5 jobs a page. (batch_id, state, created_at, id) gives each page in
order from where the last one stopped. It replaces ix_jobs_batch_state, its prefix, which
serves every query that index served: the jobs table keeps the same number of indexes to
update at each state change.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_batch_state_created", "jobs", ["batch_id", "state", "created_at", "id"]
    )
    op.drop_index("ix_jobs_batch_state", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_batch_state", "jobs", ["batch_id", "state"])
    op.drop_index("ix_jobs_batch_state_created", table_name="jobs")
