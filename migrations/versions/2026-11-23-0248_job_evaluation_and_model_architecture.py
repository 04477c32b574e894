"""job evaluation and model architecture

Revision ID: 7af70a82f5a7
Revises: 98e3404c4a9d
Create Date: 2026-11-23 02:48:34.210271
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "7af70a82f5a7"
down_revision: str | None = "98e3404c4a9d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "evaluation",
                sa.JSON(none_as_null=True).with_variant(
                    postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
                ),
                nullable=True,
            )
        )

    with op.batch_alter_table("registered_model", schema=None) as batch_op:
        batch_op.add_column(sa.Column("architecture", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registered_model", schema=None) as batch_op:
        batch_op.drop_column("architecture")

    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("evaluation")
