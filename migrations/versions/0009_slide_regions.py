"""Slide regions: the tile grid on the slide (level-0 tile size and stride), and an index of
a slide's tiles by place, for region queries that visit only a viewport's tiles.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GRID_COLUMNS = ('tile_w0', 'tile_h0', 'tile_stride_x', 'tile_stride_y')


def upgrade() -> None:
    for name in _GRID_COLUMNS:
        op.add_column('slides', sa.Column(name, sa.Integer(), nullable=True))
    op.create_index(
        'ix_jobs_tile_grid',
        'jobs',
        ['batch_id', 'tile_y', 'tile_x'],
        postgresql_where=sa.text("kind = 'tile'"),
    )
    # Slides planned before: the tile size from any of their tiles (all have the same).
    # Their stride is not on any row, so it stays null (region queries then take the
    # viewport's rows as a range).
    op.execute(
        "UPDATE slides s SET tile_w0 = t.tile_w, tile_h0 = t.tile_h "
        "FROM (SELECT DISTINCT ON (batch_id) batch_id, tile_w, tile_h FROM jobs "
        "WHERE kind = 'tile' ORDER BY batch_id) t WHERE t.batch_id = s.id"
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_tile_grid', table_name='jobs', postgresql_where=sa.text("kind = 'tile'"))
    for name in reversed(_GRID_COLUMNS):
        op.drop_column('slides', name)
