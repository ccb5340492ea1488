"""embedding_map jobs: the job kind, and embedding_map_points (x, y, label per (map job, image)).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

tests/services/test_storage.py checks that an upgraded database and the models do not differ.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = "kind IN ('pretrain', 'mine', 'train', 'pipeline')"
NEW_KINDS = "kind IN ('pretrain', 'mine', 'train', 'pipeline', 'embedding_map')"


def upgrade() -> None:
    # The naming convention turns "kind" into ck_jobs_kind, as in 0001.
    op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", NEW_KINDS)
    op.create_table(
        "embedding_map_points",
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("x", sa.Float(precision=53), nullable=False),
        sa.Column("y", sa.Float(precision=53), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_embedding_map_points_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_embedding_map_points_image_id_images"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "image_id", name=op.f("pk_embedding_map_points")),
    )
    op.create_index("ix_embedding_map_points_image_id", "embedding_map_points", ["image_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_embedding_map_points_image_id", table_name="embedding_map_points")
    op.drop_table("embedding_map_points")
    op.execute("DELETE FROM jobs WHERE kind = 'embedding_map'")  # the old constraint refuses them
    op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", OLD_KINDS)
