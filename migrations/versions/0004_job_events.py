"""job events (the log behind the live-status streams), webhooks

One row per job state change, written in the transaction that made the change; its
bigserial id is the Server-Sent Events id. Batches and jobs get an optional callback
URL, and webhook_deliveries holds the webhooks to deliver (written with the state change).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('job_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('batch_id', sa.Uuid(), nullable=True),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
              nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_job_events_batch_id', 'job_events', ['batch_id', 'id'], unique=False)
    op.create_index('ix_job_events_job_id', 'job_events', ['job_id', 'id'], unique=False)

    for table in ('batches', 'jobs'):
        op.add_column(table, sa.Column('callback_url', sa.Text(), nullable=True))
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
              nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
              nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries',
                    ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    for table in ('jobs', 'batches'):
        op.drop_column(table, 'callback_url')
    op.drop_index('ix_job_events_job_id', table_name='job_events')
    op.drop_index('ix_job_events_batch_id', table_name='job_events')
    op.drop_table('job_events')
