"""job timeline: when a job's image was fetched and its model call returned

Two nullable timestamps on jobs, written by the worker with the result; with created_at,
started_at and finished_at they make the timeline of GET /v1/jobs/{id}.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-14 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ('fetched_at', 'inferred_at')


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column('jobs', sa.Column(column, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column('jobs', column)
