"""image_embeddings: keyed by the embedding options too (embed_key), not by the checkpoint alone.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

An image's embedding depends on the checkpoint and on mining options (mine.embed_resize,
mine.embed_crop, mine.decode_draft, mine.knn_features: orl.config.MineConfig.embedding_params).
Rows keyed by the checkpoint alone let a second job with other options reuse the first job's
embeddings. The new primary key is (image_id, checkpoint_id, embed_key), embed_key being
services.common.plan.embed_key of the options.

The existing rows are deleted, not kept: no column records which options computed them, so no
key can be given to them truthfully. They are a cache: the next mining or embedding-map job of a
checkpoint computes its images' embeddings again (its neighbours, pairs and map points, stored
per job, are untouched). The downgrade deletes the rows too, for the same reason the other way
round (rows of several keys would collide in the old primary key).

tests/services/test_storage.py checks that an upgraded database and the models do not differ.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM image_embeddings")
    op.drop_index("ix_image_embeddings_checkpoint_id", table_name="image_embeddings")
    op.drop_constraint(op.f("pk_image_embeddings"), "image_embeddings", type_="primary")
    op.add_column("image_embeddings", sa.Column("embed_key", sa.String(length=64), nullable=False))
    op.create_primary_key(op.f("pk_image_embeddings"), "image_embeddings", ["image_id", "checkpoint_id", "embed_key"])
    op.create_index("ix_image_embeddings_checkpoint_id_embed_key", "image_embeddings", ["checkpoint_id", "embed_key"],
                    unique=False)


def downgrade() -> None:
    op.execute("DELETE FROM image_embeddings")
    op.drop_index("ix_image_embeddings_checkpoint_id_embed_key", table_name="image_embeddings")
    op.drop_constraint(op.f("pk_image_embeddings"), "image_embeddings", type_="primary")
    op.drop_column("image_embeddings", "embed_key")
    op.create_primary_key(op.f("pk_image_embeddings"), "image_embeddings", ["image_id", "checkpoint_id"])
    op.create_index("ix_image_embeddings_checkpoint_id", "image_embeddings", ["checkpoint_id"], unique=False)
