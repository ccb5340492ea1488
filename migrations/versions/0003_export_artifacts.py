"""artifacts.kind 'export': a checkpoint's backbone as TorchScript, ONNX or a torchvision state
dict, written by POST /api/v1/artifacts/{id}/export.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Only the kind's check constraint changes; tests/services/test_storage.py checks that an upgraded
database and the models do not differ.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("checkpoint", "backbone", "correspondence", "metrics")
NEW = (*OLD, "export")


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_artifacts_kind"), "artifacts", type_="check")
    op.create_check_constraint(op.f("ck_artifacts_kind"), "artifacts", _kinds(NEW))


def downgrade() -> None:
    op.execute("DELETE FROM artifacts WHERE kind = 'export'")
    op.drop_constraint(op.f("ck_artifacts_kind"), "artifacts", type_="check")
    op.create_check_constraint(op.f("ck_artifacts_kind"), "artifacts", _kinds(OLD))
