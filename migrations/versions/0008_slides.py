"""Whole slides: the slides table, and the kind, tile rectangle and tile statistics of a
job (a slide's plan and tile jobs are ordinary jobs of its batch).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TILE_COLUMNS = ('tile_x', 'tile_y', 'tile_w', 'tile_h', 'core_x0', 'core_y0', 'core_x1', 'core_y1')


def upgrade() -> None:
    op.create_table(
        'slides',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('filename', sa.Text(), nullable=False),
        sa.Column('object_key', sa.Text(), nullable=False),
        sa.Column('format', sa.String(length=32), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('model_version', sa.String(length=64), nullable=True),
        sa.Column('priority', sa.String(length=16), nullable=False),
        sa.Column('state', sa.String(length=24), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('deidentify', sa.Boolean(), nullable=False),
        sa.Column('deidentified', sa.Boolean(), nullable=False),
        sa.Column('submitted_mpp', sa.Float(), nullable=True),
        sa.Column('mpp_x', sa.Float(), nullable=True),
        sa.Column('mpp_y', sa.Float(), nullable=True),
        sa.Column('mpp_source', sa.String(length=16), nullable=True),
        sa.Column('width', sa.Integer(), nullable=True),
        sa.Column('height', sa.Integer(), nullable=True),
        sa.Column('levels', sa.Integer(), nullable=True),
        sa.Column('objective_power', sa.Float(), nullable=True),
        sa.Column('tile_size', sa.Integer(), nullable=True),
        sa.Column('tile_overlap', sa.Integer(), nullable=True),
        sa.Column('tissue_area_mm2', sa.Float(), nullable=True),
        sa.Column('tiles_total', sa.Integer(), nullable=False),
        sa.Column('thumbnail_key', sa.Text(), nullable=True),
        sa.Column('mask_key', sa.Text(), nullable=True),
        sa.Column('summary', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('callback_url', sa.Text(), nullable=True),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.Column('planned_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['id'], ['batches.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_slides_tenant_created', 'slides', ['tenant', 'created_at'])
    op.add_column(
        'jobs', sa.Column('kind', sa.String(length=8), server_default='image', nullable=False)
    )
    for name in _TILE_COLUMNS:
        op.add_column('jobs', sa.Column(name, sa.Integer(), nullable=True))
    op.add_column('jobs', sa.Column('tile_stats', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'tile_stats')
    for name in reversed(_TILE_COLUMNS):
        op.drop_column('jobs', name)
    op.drop_column('jobs', 'kind')
    op.drop_index('ix_slides_tenant_created', table_name='slides')
    op.drop_table('slides')
