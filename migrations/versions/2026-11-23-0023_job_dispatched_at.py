"""job dispatched_at

Revision ID: 024f54cdc7dc
Revises: 91aa3d024ca2
Create Date: 2026-11-23 00:23:11.767058
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "024f54cdc7dc"
down_revision: str | None = "91aa3d024ca2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dispatched_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("dispatched_at")
