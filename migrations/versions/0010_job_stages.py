"""Job stages: how long each step of a job's last run took, ms (common.stages).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 09:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('stages', postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'stages')
