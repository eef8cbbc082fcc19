"""webhook secrets: one signing secret per tenant

Standard Webhooks intends one secret per receiver: with one secret for every tenant, a
tenant that can verify its own webhooks can forge another's. The secret is stored as is
(the worker signs with it), with the previous one kept for the overlap after a rotation.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'webhook_secrets',
        sa.Column('tenant', sa.String(64), primary_key=True),
        sa.Column('secret', sa.Text(), nullable=False),
        sa.Column('previous_secret', sa.Text(), nullable=True),
        sa.Column('rotated_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )


def downgrade() -> None:
    op.drop_table('webhook_secrets')
