"""pair_reviews: a reviewer's verdict (correct | wrong) on a mined pair, one per (pair, reviewer).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

tests/services/test_storage.py checks that an upgraded database and the models do not differ.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pair_reviews",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("pair_id", sa.BigInteger(), nullable=False),
        sa.Column("reviewer", sa.String(length=100), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("verdict IN ('correct', 'wrong')", name=op.f("ck_pair_reviews_verdict")),
        sa.ForeignKeyConstraint(["pair_id"], ["roi_pairs.id"], name=op.f("fk_pair_reviews_pair_id_roi_pairs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pair_reviews")),
        sa.UniqueConstraint("pair_id", "reviewer", name=op.f("uq_pair_reviews_pair_id_reviewer")),
    )


def downgrade() -> None:
    op.drop_table("pair_reviews")
