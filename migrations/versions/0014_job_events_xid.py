"""job events ordered by writing transaction: job_events.xid

The event log kept its ids in commit order with one advisory lock that every job-state
transaction took until its commit, so all workers' writes queued on it. Each event now
carries its transaction's id (``pg_current_xact_id()``), and readers read ``(xid, id)``
in order below their snapshot's xmin (common.event_log), which needs no lock. Rows
written before get xid 0, before every new one, as they are all committed: a constant
default, so adding the column rewrites nothing; the default becomes the writer's xid after.
The (job_id, id) and (batch_id, id) indexes become (job_id, xid, id) and
(batch_id, xid, id), the readers' order: the table keeps its number of indexes.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


class Xid8(sa.types.UserDefinedType[int]):
    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "job_events",
        sa.Column("xid", Xid8(), nullable=False, server_default=sa.text("'0'::xid8")),
    )
    op.alter_column("job_events", "xid", server_default=sa.text("pg_current_xact_id()"))
    op.create_index("ix_job_events_batch_xid", "job_events", ["batch_id", "xid", "id"])
    op.create_index("ix_job_events_job_xid", "job_events", ["job_id", "xid", "id"])
    op.drop_index("ix_job_events_batch_id", table_name="job_events")
    op.drop_index("ix_job_events_job_id", table_name="job_events")


def downgrade() -> None:
    op.create_index("ix_job_events_batch_id", "job_events", ["batch_id", "id"])
    op.create_index("ix_job_events_job_id", "job_events", ["job_id", "id"])
    op.drop_index("ix_job_events_batch_xid", table_name="job_events")
    op.drop_index("ix_job_events_job_xid", table_name="job_events")
    op.drop_column("job_events", "xid")
