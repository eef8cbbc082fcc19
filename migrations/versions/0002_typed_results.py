"""typed results: jobs.task, model_version, result, question; drop detections

Boxes now live in jobs.result with every other task's result shape.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every job before this revision was a detection job.
    op.add_column('jobs', sa.Column('task', sa.String(length=16), nullable=False,
                                    server_default='detect'))
    op.alter_column('jobs', 'task', server_default=None)
    op.add_column('jobs', sa.Column('model_version', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('result', postgresql.JSONB(), nullable=True))
    op.add_column('jobs', sa.Column('question', sa.Text(), nullable=True))
    op.create_index('ix_jobs_model_state', 'jobs', ['model', 'state'], unique=False)
    op.execute("""
        UPDATE jobs SET result = jsonb_build_object(
            'task', 'detect',
            'boxes', COALESCE((
                SELECT jsonb_agg(jsonb_build_object(
                    'label', d.label, 'class_id', d.class_id, 'score', d.score,
                    'x1', d.x1, 'y1', d.y1, 'x2', d.x2, 'y2', d.y2) ORDER BY d.score DESC)
                FROM detections d WHERE d.job_id = jobs.id), '[]'::jsonb))
        WHERE state = 'done'
    """)
    op.drop_index(op.f('ix_detections_job_id'), table_name='detections')
    op.drop_table('detections')


def downgrade() -> None:
    op.create_table('detections',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('class_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('x1', sa.Float(), nullable=False),
    sa.Column('y1', sa.Float(), nullable=False),
    sa.Column('x2', sa.Float(), nullable=False),
    sa.Column('y2', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_detections_job_id'), 'detections', ['job_id'], unique=False)
    op.drop_index('ix_jobs_model_state', table_name='jobs')
    op.drop_column('jobs', 'question')
    op.drop_column('jobs', 'result')
    op.drop_column('jobs', 'model_version')
    op.drop_column('jobs', 'task')
