"""register jobs: recording a dataset folder's files is a job (POST /api/v1/datasets answers at
once with the job; a miner CPU worker scans the folder and checksums the files).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

Only the kind's check constraint changes; a dataset's status (registering, ready, incomplete)
is read from its register jobs, so no column is added. tests/services/test_storage.py checks
that an upgraded database and the models do not differ.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("pretrain", "mine", "train", "pipeline", "embedding_map")
NEW = (*OLD, "register")


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def upgrade() -> None:
    # The naming convention turns "kind" into ck_jobs_kind, as in 0001 and 0004.
    op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", _kinds(NEW))


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'register'")  # the old constraint refuses them
    op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", _kinds(OLD))
