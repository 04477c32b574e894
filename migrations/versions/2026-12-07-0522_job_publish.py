"""job publish

Which weights a job publishes as its fine-tuned model (`publish`: best or last, NULL for jobs created
before it, which published the last) and the step they are from (`published_step`).

Revision ID: 5d0c1e7a9b21
Revises: 73633dabd6da
Create Date: 2026-12-07 05:22:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d0c1e7a9b21"
down_revision: str | None = "73633dabd6da"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("publish", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("published_step", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("published_step")
        batch_op.drop_column("publish")
