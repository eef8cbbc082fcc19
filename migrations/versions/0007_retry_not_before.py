"""Retries wait: a not-before time on jobs that claims respect.

A failed attempt with attempts left goes back to pending with ``not_before`` set to
now + an exponential, jittered backoff, so a store restart of a few seconds does not use
up every attempt of the jobs it catches.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'not_before')
