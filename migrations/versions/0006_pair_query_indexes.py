"""roi_pairs: the indexes of two /correspondences filters the dashboard sends.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08

- (job_id, hashint8extended(id, 0), id) for ``order=random``: a seeded random sample walks a
  fixed shuffle of a job's pairs (a hash of the pair id) from a point the seed picks
  (services/api/routers/correspondences.py, ``_random_page``); a page is two short range scans
  instead of a sort of every pair of the job.
- (job_id, query box area, neighbour box area) for ``min_area`` / ``max_area``: a tight range is a
  range scan instead of a scan of the whole table, and ANALYZE keeps statistics of both areas, so
  a loose range still walks the score index.

On a million pairs both queries took hundreds of milliseconds a page before
(benchmarks/api_load_benchmark.py, EXPLAIN in benchmarks/results/api_load.md), about one after.
tests/services/test_storage.py checks that an upgraded database and the models do not differ.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_roi_pairs_job_id_sample_key", "roi_pairs",
                    ["job_id", sa.text("hashint8extended(id, 0)"), "id"], unique=False)
    op.create_index("ix_roi_pairs_job_id_areas", "roi_pairs",
                    ["job_id", sa.text("((qx2 - qx1) * (qy2 - qy1))"), sa.text("((nx2 - nx1) * (ny2 - ny1))")],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_roi_pairs_job_id_areas", table_name="roi_pairs")
    op.drop_index("ix_roi_pairs_job_id_sample_key", table_name="roi_pairs")
