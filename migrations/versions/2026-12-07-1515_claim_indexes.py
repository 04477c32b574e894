"""claim indexes

The claim's indexes: `ix_fine_tuning_job_queued`, a partial index of the queued jobs by organisation,
priority (descending) and age, replaces `ix_fine_tuning_job_claim` (every job by status, organisation,
priority, age: its ascending priority made Postgres sort each organisation's queued jobs); and
`ix_fine_tuning_job_started_at` for the fair-share window (a full scan of every job before).

Revision ID: 6ceaf7f3d42d
Revises: 8e4f2b6c1d37
Create Date: 2026-12-07 15:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6ceaf7f3d42d"
down_revision: str | None = "8e4f2b6c1d37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.drop_index("ix_fine_tuning_job_claim", table_name="fine_tuning_job")
    op.create_index(
        "ix_fine_tuning_job_queued",
        "fine_tuning_job",
        ["organization_id", sa.text("priority DESC"), "seq"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )
    op.create_index("ix_fine_tuning_job_started_at", "fine_tuning_job", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_fine_tuning_job_started_at", table_name="fine_tuning_job")
    op.drop_index("ix_fine_tuning_job_queued", table_name="fine_tuning_job")
    op.create_index(
        "ix_fine_tuning_job_claim", "fine_tuning_job", ["status", "organization_id", "priority", "seq"]
    )
