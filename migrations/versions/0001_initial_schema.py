"""Initial schema: the tables of docs/SERVICES.md, their unique keys and the API's indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Generated from services/common/models.py and reviewed; tests/services/test_storage.py checks that
an upgraded database and the models do not differ.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('images',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('dataset_id', sa.BigInteger(), nullable=False),
    sa.Column('rel_path', sa.Text(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('checksum', sa.String(length=40), nullable=True),
    sa.Column('status', sa.String(length=16), server_default='ok', nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('ok', 'failed')", name=op.f('ck_images_status')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_images_dataset_id_datasets'),
        ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('dataset_id', 'rel_path', name=op.f('uq_images_dataset_id_rel_path'))
    )
    op.create_index('ix_images_dataset_id_status_id', 'images', ['dataset_id', 'status', 'id'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('dataset_id', sa.BigInteger(), nullable=False),
    sa.Column('parent_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), server_default='queued', nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('progress_done', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('progress_total', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('progress', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
        nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('pretrain', 'mine', 'train', 'pipeline')", name=op.f('ck_jobs_kind')),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelling', 'cancelled')",
        name=op.f('ck_jobs_status')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_jobs_dataset_id_datasets'),
        ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['jobs.id'], name=op.f('fk_jobs_parent_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_jobs_idempotency_key'))
    )
    op.create_index('ix_jobs_dataset_id_id', 'jobs', ['dataset_id', 'id'], unique=False)
    op.create_index('ix_jobs_parent_id', 'jobs', ['parent_id'], unique=False)
    op.create_index('ix_jobs_status_kind_id', 'jobs', ['status', 'kind', 'id'], unique=False)
    op.create_table('artifacts',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.BigInteger(), nullable=True),
    sa.Column('dataset_id', sa.BigInteger(), nullable=True),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('meta', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("kind IN ('checkpoint', 'backbone', 'correspondence', 'metrics')",
        name=op.f('ck_artifacts_kind')),
    sa.CheckConstraint("stage IS NULL OR stage IN ('byol', 'orl')", name=op.f('ck_artifacts_stage')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_artifacts_dataset_id_datasets'),
        ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_artifacts_job_id_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts'))
    )
    op.create_index('ix_artifacts_dataset_id_kind', 'artifacts', ['dataset_id', 'kind'], unique=False)
    op.create_index('ix_artifacts_job_id', 'artifacts', ['job_id'], unique=False)
    op.create_table('neighbors',
    sa.Column('job_id', sa.BigInteger(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('neighbor_image_id', sa.BigInteger(), nullable=False),
    sa.Column('similarity', sa.Float(precision=53), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_neighbors_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_neighbors_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['neighbor_image_id'], ['images.id'], name=op.f('fk_neighbors_neighbor_image_id_images'),
        ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'image_id', 'rank', name=op.f('pk_neighbors'))
    )
    op.create_index('ix_neighbors_neighbor_image_id', 'neighbors', ['neighbor_image_id'], unique=False)
    op.create_table('proposal_status',
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('params_key', sa.String(length=64), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('n_raw', sa.Integer(), server_default='0', nullable=False),
    sa.Column('n_boxes', sa.Integer(), server_default='0', nullable=False),
    sa.Column('seconds', sa.Float(precision=53), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_proposal_status_image_id_images'),
        ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', 'params_key', name=op.f('pk_proposal_status'))
    )
    op.create_table('proposals',
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('params_key', sa.String(length=64), nullable=False),
    sa.Column('ord', sa.Integer(), nullable=False),
    sa.Column('x1', sa.Float(precision=53), nullable=False),
    sa.Column('y1', sa.Float(precision=53), nullable=False),
    sa.Column('x2', sa.Float(precision=53), nullable=False),
    sa.Column('y2', sa.Float(precision=53), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_proposals_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', 'params_key', 'ord', name=op.f('pk_proposals'))
    )
    op.create_table('roi_pairs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.BigInteger(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('neighbor_image_id', sa.BigInteger(), nullable=False),
    sa.Column('neighbor_rank', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(precision=53), nullable=False),
    sa.Column('qx1', sa.Float(precision=53), nullable=False),
    sa.Column('qy1', sa.Float(precision=53), nullable=False),
    sa.Column('qx2', sa.Float(precision=53), nullable=False),
    sa.Column('qy2', sa.Float(precision=53), nullable=False),
    sa.Column('nx1', sa.Float(precision=53), nullable=False),
    sa.Column('ny1', sa.Float(precision=53), nullable=False),
    sa.Column('nx2', sa.Float(precision=53), nullable=False),
    sa.Column('ny2', sa.Float(precision=53), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_roi_pairs_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_roi_pairs_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['neighbor_image_id'], ['images.id'], name=op.f('fk_roi_pairs_neighbor_image_id_images'),
        ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_roi_pairs')),
    sa.UniqueConstraint('job_id', 'image_id', 'neighbor_image_id', 'rank',
        name=op.f('uq_roi_pairs_job_id_image_id_neighbor_image_id_rank'))
    )
    op.create_index('ix_roi_pairs_image_id_score_id', 'roi_pairs', ['image_id', sa.literal_column('score DESC'), 'id'],
        unique=False)
    op.create_index('ix_roi_pairs_job_id_score_id', 'roi_pairs', ['job_id', sa.literal_column('score DESC'), 'id'],
        unique=False)
    op.create_index('ix_roi_pairs_neighbor_image_id', 'roi_pairs', ['neighbor_image_id'], unique=False)
    op.create_index('ix_roi_pairs_score_id', 'roi_pairs', [sa.literal_column('score DESC'), 'id'], unique=False)
    op.create_table('image_embeddings',
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('checkpoint_id', sa.BigInteger(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['artifacts.id'],
        name=op.f('fk_image_embeddings_checkpoint_id_artifacts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_image_embeddings_image_id_images'),
        ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', 'checkpoint_id', name=op.f('pk_image_embeddings'))
    )
    op.create_index('ix_image_embeddings_checkpoint_id', 'image_embeddings', ['checkpoint_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_image_embeddings_checkpoint_id', table_name='image_embeddings')
    op.drop_table('image_embeddings')
    op.drop_index('ix_roi_pairs_score_id', table_name='roi_pairs')
    op.drop_index('ix_roi_pairs_neighbor_image_id', table_name='roi_pairs')
    op.drop_index('ix_roi_pairs_job_id_score_id', table_name='roi_pairs')
    op.drop_index('ix_roi_pairs_image_id_score_id', table_name='roi_pairs')
    op.drop_table('roi_pairs')
    op.drop_table('proposals')
    op.drop_table('proposal_status')
    op.drop_index('ix_neighbors_neighbor_image_id', table_name='neighbors')
    op.drop_table('neighbors')
    op.drop_index('ix_artifacts_job_id', table_name='artifacts')
    op.drop_index('ix_artifacts_dataset_id_kind', table_name='artifacts')
    op.drop_table('artifacts')
    op.drop_index('ix_jobs_status_kind_id', table_name='jobs')
    op.drop_index('ix_jobs_parent_id', table_name='jobs')
    op.drop_index('ix_jobs_dataset_id_id', table_name='jobs')
    op.drop_table('jobs')
    op.drop_index('ix_images_dataset_id_status_id', table_name='images')
    op.drop_table('images')
    op.drop_table('datasets')
